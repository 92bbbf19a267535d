"""The inductive-bias & scale lab: CNN vs ViT vs relative attention vs a mini CoAtNet,
trained from scratch on growing subsets of Fashion-MNIST (`engine`), the shipped result grid
(`grid`), what it shows (`analysis`) and the lab's models (`models`)."""
