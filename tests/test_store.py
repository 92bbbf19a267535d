"""The session store and kept results: bounded in bytes for any number of sessions; evicted
results rebuilt; bundled examples computed once."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app
from explorer import store
from explorer.images import example_paths
from explorer.settings import Settings

SIZE = 56  # 4x4 patches of the default ViT-S/14: analyses in well under a second


def test_store_stays_under_its_bound_and_rebuilds_what_it_dropped():
    kept = store.SessionStore(max_bytes=3 * 1000)
    built = []

    def build(n):
        built.append(n)
        return np.zeros(1000, np.uint8)

    refs = [kept.keep((f"s{i}", "tab"), i, build(i)) for i in range(10)]
    assert kept.nbytes <= 3 * 1000 and len(kept) == 3
    assert kept.get_or_rebuild(refs[-1], build) is not None and kept.rebuilds == 0
    assert kept.get_or_rebuild(refs[0], build).nbytes == 1000  # evicted: rebuilt
    assert kept.rebuilds == 1 and built[-1] == 0
    # one entry per key: a newer analysis replaces the older one...
    newer = kept.keep(("s0", "tab"), 99, np.zeros(10, np.uint8))
    assert len(kept) == 3 and kept.get_or_rebuild(newer, build).nbytes == 10
    # ...and the older ref is rebuilt from its own inputs, never handed the newer result
    assert kept.get_or_rebuild(refs[0], build).nbytes == 1000


def test_the_app_bounds_the_store_from_its_settings(monkeypatch):
    monkeypatch.setattr(store.STORE.cache, "max_bytes", store.STORE.cache.max_bytes)
    app.build_demo(replace(Settings.from_env(), store_mb=1.5))
    assert store.STORE.cache.max_bytes == int(1.5 * 2**20)


def test_a_session_finds_its_kept_result_by_type_and_inputs_and_loses_it_when_it_ends():
    from explorer.session_context import context

    @dataclass
    class Kept:
        n: int

    @dataclass
    class Other:
        n: int

    alice, bob = context("alice-test"), context("bob-test")
    ref = alice.keep(Kept(1), ("photo.jpg", 224))
    assert alice.peek(Kept, ("photo.jpg", 224)) == Kept(1)
    assert alice.peek(Kept, ("photo.jpg", 336)) is None  # other inputs: not this result
    assert alice.peek(Other, ("photo.jpg", 224)) is None  # another kind of result
    assert bob.peek(Kept, ("photo.jpg", 224)) is None  # another session never sees it
    alice.keep(Other(2), ("photo.jpg", 224))  # a second kind sits beside the first
    assert alice.kept(ref, lambda inputs: Kept(-1)) == Kept(1)
    alice.end()
    assert alice.peek(Kept, ("photo.jpg", 224)) is None
    assert alice.kept(ref, lambda inputs: Kept(len(inputs))) == Kept(2)  # rebuilt from inputs


@pytest.fixture(scope="module")
def url():
    demo = app.build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo.local_url
    demo.close()


def attention(client, photo):
    return client.predict(handle_file(photo), None, SIZE, SIZE, "crop", 12, "mean", "mean", 0.0,
                          1, 0.6, 0.6, "inferno", "mean", api_name="/attention")


def views(client, layer=6):
    return client.predict(layer, "mean", "mean", 0.0, 1, 0.6, 0.6, "inferno",
                          api_name="/attention_views")


def test_more_sessions_than_fit_stay_under_the_bound_and_rebuild(url, tmp_path, monkeypatch):
    photo = str(example_paths()[0])
    first = Client(url, verbose=False)
    attention(first, photo)
    one = store.STORE.nbytes
    assert one > 0
    monkeypatch.setattr(store.STORE.cache, "max_bytes", int(1.5 * one))  # room for one
    others = [Client(url, verbose=False) for _ in range(3)]
    for client in others:
        attention(client, photo)
        assert store.STORE.nbytes <= 1.5 * one
    assert len(store.STORE) == 1
    rebuilds = store.STORE.rebuilds
    out = views(first)  # evicted: analysed again from the inputs its state kept
    assert store.STORE.rebuilds == rebuilds + 1
    assert Path(out[0]).is_file() and "patch token(s) above" in out[7]  # heads, norm note
    assert store.STORE.nbytes <= 1.5 * one


def test_a_dropped_analysis_whose_upload_is_gone_says_to_press_the_button(url, tmp_path,
                                                                          monkeypatch):
    photo = tmp_path / "mine.jpg"
    shutil.copy(example_paths()[1], photo)
    mine, other = Client(url, verbose=False), Client(url, verbose=False)
    attention(mine, str(photo))
    (inputs, size), = [(value[0], size) for value, size in store.STORE.cache._items.values()
                       if os.path.basename(value[0].image) == "mine.jpg"]
    monkeypatch.setattr(store.STORE.cache, "max_bytes", int(1.5 * size))  # room for one
    attention(other, str(example_paths()[0]))  # evicts mine
    os.remove(inputs.image)  # the server's copy of the upload is gone too
    with pytest.raises(Exception, match="press Show attention again"):
        views(mine)


def test_a_bundled_examples_tokens_are_kept_and_served_as_files(tmp_path):
    from explorer.ui import tokens_tab

    example = str(example_paths()[0])
    copy = tmp_path / "upload.jpg"  # an upload of the same example: same bytes, other path
    shutil.copy(example, copy)
    first = tokens_tab.tokens(example, None, SIZE, SIZE, "crop")
    assert tokens_tab.tokens(str(copy), None, SIZE, SIZE, "crop") is first
    computed = tokens_tab._tokens(example, None, SIZE, SIZE, "crop")
    for name in ("grid", "sequence", "filters", "pos_native", "pos_chosen", "pca"):
        # PNG files written once, holding the very pixels computed
        assert np.array_equal(np.asarray(Image.open(first[name]).convert("RGB")),
                              computed[name]), name
    other = tmp_path / "other.jpg"
    Image.open(example).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    fresh = tokens_tab.tokens(str(other), None, SIZE, SIZE, "crop")
    assert fresh is not first and isinstance(fresh["grid"], np.ndarray)  # not an example
    opened = tokens_tab.first_example()
    assert opened["image"] == str(example_paths()[0]) and "patch tokens" in opened["summary"]


def test_rerenders_from_kept_results_never_queue_behind_forward_passes():
    events = {fn.api_name: fn for fn in app.build_demo().fns.values()}
    forwards = {events[name].concurrency_id for name in ("tokens", "attention", "distance")}
    for name in ("attention_views", "attention_pick", "attention_query", "attention_query_update"):
        assert events[name].concurrency_id not in forwards, name
        assert events[name].concurrency_limit >= 2, name


def test_distance_reuses_the_sessions_attention_maps_of_the_same_upload(url):
    photo = str(example_paths()[2])
    client = Client(url, verbose=False)

    def dist():
        return client.predict(handle_file(photo), None, [], False, False, SIZE, SIZE, "crop",
                              "drop", api_name="/distance")

    fresh = dist()[2]
    assert "images/s" in fresh
    attention(client, photo)
    reused = dist()
    assert "no new forward pass" in reused[2]
    other = Client(url, verbose=False)  # another session never reads this one's maps
    assert "images/s" in other.predict(handle_file(photo), None, [], False, False, SIZE, SIZE,
                                       "crop", "drop", api_name="/distance")[2]


def sent(outputs) -> list[int]:
    """Indices of the outputs sent (a skipped one arrives as a bare update)."""
    return [i for i, v in enumerate(outputs) if v != {"__type__": "update"}]


def test_a_rerender_sends_only_the_views_its_change_affects(url):
    client = Client(url, verbose=False)
    attention(client, str(example_paths()[0]))
    out = client.predict(6, "mean", "mean", 0.0, 1, 0.6, 0.6, "inferno",
                         api_name="/attention_views")  # the layer: heads, masks, norms
    assert sent(out) == [0, 3, 5, 6, 7]
    out = client.predict(6, "mean", "mean", 0.0, 1, 0.6, 0.6, "viridis",
                         api_name="/attention_views")  # the colour map: every coloured view
    assert sent(out) == [0, 1, 2, 5, 8]
