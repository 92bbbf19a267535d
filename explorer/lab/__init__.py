"""The inductive-bias & scale lab: CNN vs ViT vs relative attention vs a mini CoAtNet,
trained from scratch to convergence on growing subsets of Fashion-MNIST (`engine`: the budget
rule, on the shared loop core `explorer.training`), also on scrambled images (`scramble`),
with hyperparameters from a validation sweep (`sweep`); the resumable result grid (`grid`,
files in `paths`), what it shows (`analysis`, `summary`) and the lab's models (`models`)."""
