"""The fine-tuning tab in real Chromium: upload a zip, train, see curves and the new model."""

from __future__ import annotations

import re
import zipfile

from PIL import Image

from explorer import datasets
from tests.browser.helpers import open_tab, screenshot

# The tab whose model picker must list the fine-tuned model (explorer/ui/attention_tab.py,
# labelled in app.py's TABS).
ATTENTION_TAB = "Attention maps"


def make_zip(path, per_class: int = 8):
    """Trousers vs bags from Fashion-MNIST, as an ImageFolder zip with a wrapper folder."""
    data = datasets.fashion_mnist("test", 200, seed=0)
    with zipfile.ZipFile(path, "w") as zf:
        for label, name in ((1, "trouser"), (8, "bag")):
            for i, index in enumerate(datasets.np.flatnonzero(data.labels == label)[:per_class]):
                png = path.parent / f"{name}{i}.png"
                Image.fromarray(data.sources[index]).save(png)
                zf.write(png, f"clothes/{name}/{i}.png")
        zf.writestr("clothes/notes.txt", "not an image")
    return path


def test_upload_train_and_find_model_in_attention_picker(page, tmp_path):
    open_tab(page, "Fine-tune")
    page.locator("#ft-source").get_by_text("Upload a zip").click()
    page.locator("#ft-zip input[type=file]").set_input_files(str(make_zip(tmp_path / "c.zip")))
    summary = page.locator("#ft-data-summary")
    summary.get_by_text("16 images in 2 classes").wait_for()
    assert "1 not an image file" in summary.inner_text()
    page.locator("#ft-counts .js-plotly-plot").wait_for()

    page.locator("#ft-resolution input").fill("56")
    page.locator("#ft-epochs input").fill("4")
    page.locator("#ft-batch input").fill("4")
    page.locator("#ft-train").click()
    result = page.locator("#ft-result")
    result.get_by_text("Validation accuracy").wait_for(timeout=240_000)
    curves = page.locator("#ft-curves .js-plotly-plot")
    curves.get_by_text("validation").first.wait_for()  # legend of the streamed curves
    assert "loss" in curves.inner_text() and "accuracy" in curves.inner_text()
    page.locator("#ft-confusion .js-plotly-plot").get_by_text("Confusion matrix").wait_for()
    assert page.locator("#ft-pos-similarity img").first.evaluate("el => el.naturalWidth") > 50
    assert page.locator("#ft-checkpoint").get_by_text(".zip").count() >= 1
    name = re.search(r"fine-tuned: [\w.-]+", result.inner_text()).group(0)
    screenshot(page, "finetune")

    open_tab(page, ATTENTION_TAB)
    picker = page.get_by_label("Model").filter(visible=True).first
    picker.click()
    page.get_by_role("option", name=name).wait_for()
