"""The lab tab through `gradio_client` on the real app: a live run streams, lands on the
plot, and its ViT opens in its own session's other tabs only; the relative views render."""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest
from gradio_client import Client, handle_file

import app
from explorer import datasets
from explorer.cache import KeyedCache
from explorer.lab import checkpoint as lab_checkpoint
from explorer.lab import grid
from explorer.settings import Settings
from explorer.ui import lab_view
from tests.process_helpers import trainers

IMAGE = "assets/examples/rocket.jpg"
pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist")


def _serving(lab_steps: int):
    """The real app, serving, with live runs of ``lab_steps`` steps."""
    demo = app.build_demo(replace(Settings.from_env(), lab_steps=lab_steps))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def demo():
    yield from _serving(12)  # a tiny live point, not the grid's budget


def _choices(client) -> list[str]:
    return [c[0] for c in client.predict([], api_name="/distance_models")["choices"]]


def test_a_live_vit_lands_on_the_plot_and_opens_in_its_session_only(demo):
    alice, bob = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    status, live, data_plot = alice.predict("vit_rel", 500, 0, api_name="/lab_train")
    assert "test accuracy" in status
    name = re.search(r"Saved as \*\*(fine-tuned: lab-vit_rel[^*]+)\*\*", status).group(1)
    assert "shipped grid has" not in status  # 12 steps is not the grid's budget: no claim
    assert name in _choices(alice) and name not in _choices(bob)
    summary = alice.predict(handle_file(IMAGE), name, 0, 0, "crop", api_name="/tokens")[0]
    assert "7x7" in summary  # a 28-px model with 4-px patches, from its own geometry
    with pytest.raises(Exception, match="private"):
        bob.predict(handle_file(IMAGE), name, 0, 0, "crop", api_name="/tokens")
    assert live["type"] == "plotly" and data_plot["type"] == "plotly"
    assert '"star"' in data_plot["plot"]  # the visitor's point on the grid's plot
    alice.close()
    bob.close()


def test_live_run_refuses_what_it_does_not_offer(demo):
    client = Client(demo.local_url, verbose=False)
    for args in (("vit", 777, 0), ("resnet", 500, 0), ("vit", 500, 9)):
        with pytest.raises(Exception, match="Live runs use|Pick an architecture|not in the list"):
            client.predict(*args, api_name="/lab_train")
    client.close()


def test_relative_views_say_in_place_when_the_model_is_still_training(demo, tmp_path,
                                                                     monkeypatch):
    """A size whose relative model the grid has not kept yet (here: an empty models folder,
    and nothing loaded before) says so in place, with empty plots."""
    monkeypatch.setattr(lab_checkpoint, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(lab_checkpoint, "_SHIPPED", KeyedCache(max_items=8))
    size = min(n for a, n in grid.KEEP_MODELS if a == "vit_rel")
    client = Client(demo.local_url, verbose=False)
    status, bias, shift = client.predict(size, api_name="/lab_relative")
    assert f"trained on {size:,} images is still training" in status
    assert bias is None and shift is None
    client.close()


def test_relative_views_show_a_model_the_grid_replaces_while_the_app_serves(demo, tmp_path,
                                                                          monkeypatch):
    """The grid writes a new model over a kept one (a later attempt, a superseded recipe)
    while the app serves: the next request shows the new model's bias tables and translation
    test, not the first one's from the caches."""
    import json

    from explorer.lab.engine import LabRun
    from explorer.lab.models import build
    from explorer.ui import lab_tab

    SIZE = min(n for a, n in grid.KEEP_MODELS if a == "vit_rel")  # one the picker offers
    monkeypatch.setattr(lab_checkpoint, "MODELS_DIR", tmp_path)
    monkeypatch.setattr(lab_checkpoint, "_SHIPPED", KeyedCache(max_items=8))
    monkeypatch.setattr(lab_tab, "_SHIFT_CACHE", KeyedCache(max_items=4))

    def keep(arch, seed):  # an untrained model: any weights tell the two apart
        run = LabRun(arch, SIZE)
        return lab_checkpoint.save_shipped(build(run.spec, seed=seed), run)

    def traces(fig) -> list:
        return [t.get("z") or t.get("y") for t in json.loads(fig["plot"])["data"]]

    def views():
        _, bias, shift = client.predict(SIZE, api_name="/lab_relative")
        return traces(bias), traces(shift)

    client = Client(demo.local_url, verbose=False)
    for arch in ("cnn", "vit", "vit_rel"):
        keep(arch, 0)
    first = views()
    assert views() == first  # the same files: the same figures
    keep("vit_rel", 1)  # the grid replaces the relative model
    bias, shift = views()
    assert bias != first[0] and shift != first[1]
    client.close()


@pytest.mark.skipif(not lab_view.shipped_sizes(), reason="no shipped lab models")
def test_relative_views_render_from_the_shipped_models(demo):
    client = Client(demo.local_url, verbose=False)
    status, bias, shift = client.predict(max(lab_view.shipped_sizes()), api_name="/lab_relative")
    assert status == ""
    assert '"head 4"' in bias["plot"] and '"block 4"' in bias["plot"]
    assert "Translation test" in shift["plot"]
    client.close()
    assert grid.GRID_CSV.is_file()


def test_a_live_run_says_at_once_that_it_is_starting(demo):
    """The first step comes after the trainer's process and the data have loaded (seconds):
    the status says what is starting before then, and the run still ends with its result."""
    client = Client(demo.local_url, verbose=False)
    job = client.submit("cnn", 500, 1, api_name="/lab_train")
    job.result()
    statuses = [out[0] for out in job.outputs()]
    assert statuses[0] == "Starting: CNN on 500 images (seed 1), 12 steps…"
    assert "test accuracy" in statuses[-1]
    client.close()


@pytest.fixture(scope="module")
def long_demo():
    yield from _serving(100_000)  # a live run still training when it is stopped


def _training(client: Client):
    """A live run started through ``client`` and past its first step (its trainer running)."""
    job = client.submit("cnn", 500, 0, api_name="/lab_train")
    deadline = time.monotonic() + 120
    while not any(out[0].startswith("Step") for out in job.outputs()):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.2)
    return job


def test_stop_ends_a_live_run_at_a_step_and_its_trainer_with_it(long_demo):
    """Stop reaches the run in its own process (`explorer.trainer_process`): the run stops
    at a step, the status says so, and no trainer process is left."""
    client = Client(long_demo.local_url, verbose=False)
    job = _training(client)
    assert client.predict(api_name="/lab_stop") == "Stopping after this step…"
    assert job.result(timeout=60)[0] == "Stopped."  # not the 100,000 steps
    steps = [int(re.match(r"Step ([\d,]+)", out[0]).group(1).replace(",", ""))
             for out in job.outputs() if out[0].startswith("Step")]
    assert max(steps) < 100_000
    assert trainers() == []
    client.close()


def test_a_killed_trainer_ends_its_run_in_a_message_and_the_app_serves_on(long_demo):
    """The system kills a live run's trainer (out of memory, as its killer does): the
    visitor reads why, and the app, untouched, serves the next request."""
    import os
    import signal

    client = Client(long_demo.local_url, verbose=False)
    job = _training(client)
    os.kill(trainers()[0], signal.SIGKILL)
    with pytest.raises(Exception, match="training stopped unexpectedly.*out of memory"):
        job.result(timeout=60)
    assert trainers() == []
    figures = client.predict(False, api_name="/lab_figures")
    assert figures[0]["type"] == "plotly"
    client.close()
