"""What a web visitor may name, and fine-tunes private to their session (`explorer.sessions`).

First the rules by hand (name resolution, the registry's cap, quota and idle expiry with a
fake clock), then the running app through `gradio_client`: paths typed into any model or
dataset field are refused without naming a path, a second client never sees the first's
fine-tune, ending a session deletes its files, an operator's models dir shows by name.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app
from explorer import datasets, models, session_context, sessions
from explorer.errors import ModelUnavailableError, without_paths
from explorer.sessions import SessionLimits, SessionModels, is_hub_id, resolve_web_name
from explorer.settings import Settings
from tests import odd_vit

IMAGE = "assets/examples/chelsea.jpg"
OPERATOR_MODEL = "odd-operator"
OPERATOR_DATA = "band-photos"
PATHY = ["/etc", "local:/etc", "local:etc", "../etc", "./assets", "~/.cache", "assets/igpt",
         "C:\\Windows", "a\\b", "hf-hub:../../etc", "/tmp", "local:~/.ssh", "x/../../etc"]


def server_paths() -> list[str]:
    """Paths a message must never show: system, temp, home, working dir, caches."""
    return ["/etc", tempfile.gettempdir(), str(Path.home()), os.getcwd(), str(models.cache_dir()),
            "/usr", "/proc"]


def assert_names_no_path(message: str) -> None:
    for path in server_paths():
        assert path not in message, (path, message)
    assert not re.search(r"(^|[\s'\"(])~?/\w", message), message  # no absolute path at all


# ---------------------------------------------------------------------------------------
# Names from the web, by hand
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "vit_base_patch16_224.augreg2_in21k_ft_in1k", "hf-hub:owner/name", "deit_tiny_patch16_224",
    "hf-hub:timm/vit_small_patch14_dinov2.lvd142m"])
def test_hub_ids_pass(name):
    assert is_hub_id(name) and resolve_web_name(name, "s") == name


@pytest.mark.parametrize("name", PATHY)
def test_paths_and_local_are_refused_without_naming_a_path(name):
    with pytest.raises(ModelUnavailableError) as err:
        resolve_web_name(name, "s")
    assert_names_no_path(str(err.value))


def test_catalogue_and_default_and_operator_names_pass(tmp_path):
    assert resolve_web_name(None, "s") == resolve_web_name("", "s") == models.DEFAULT_MODEL
    odd_vit.save_odd_vit(tmp_path / "odd-by-folder")
    (tmp_path / "not-a-checkpoint").mkdir()
    assert models.register_models_dir(tmp_path) == ["odd-by-folder"]
    assert resolve_web_name("odd-by-folder", "s") == "odd-by-folder"
    assert "odd-by-folder" in sessions.web_model_names("s")
    assert "path" not in models.describe("odd-by-folder").lower()


def test_igpt_names_from_the_web():
    catalogue = {"offline": None}
    assert sessions.resolve_igpt_web_name(None, catalogue, "offline") == "offline"
    assert sessions.resolve_igpt_web_name("openai/imagegpt-small", catalogue, "x") == (
        "openai/imagegpt-small")
    for name in PATHY + ["assets/examples"]:  # an existing relative folder is a path here
        with pytest.raises(ModelUnavailableError) as err:
            sessions.resolve_igpt_web_name(name, catalogue, "offline")
        assert_names_no_path(str(err.value))


def test_without_paths_keeps_hub_ids():
    assert without_paths("No folder at '/tmp/x/y'.") == "No folder at 'y'."
    assert without_paths("hf-hub:owner/name and openai/imagegpt-small") == (
        "hf-hub:owner/name and openai/imagegpt-small")


def _message(call) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 (each loader's own error class)
        call()
    return str(err.value)


def test_loader_dataset_and_saving_messages_name_no_path(tmp_path, monkeypatch):
    """Every error path behind the web fields, fed a server folder: the message names the
    folder at most, never its path (what the UI shows, after `without_paths` too)."""
    import json

    import gradio as gr

    from explorer.finetune import FinetuneConfig, save_checkpoint
    from explorer.finetune.engine import FinetuneResult
    from explorer.igpt.checkpoint import load_local
    from explorer.ui import common

    ckpt = tmp_path / "ckpt"
    odd_vit.save_odd_vit(ckpt)
    broken = {
        "missing": lambda: None,
        "weights-only": lambda: (ckpt / "config.json").unlink(),
        "bad-json": lambda: (ckpt / "config.json").write_text("{"),
        "no-arch": lambda: (ckpt / "config.json").write_text(json.dumps({"num_classes": 2})),
    }
    messages = []
    for case, damage in broken.items():
        target = tmp_path / "nothing-here" if case == "missing" else ckpt
        damage()
        messages.append(_message(lambda t=target: models.load_vit(f"local:{t}", device="cpu")))
    messages.append(_message(lambda: models.load_vit(f"local:{tmp_path / 'x.pth'}")))
    messages.append(_message(lambda: load_local(tmp_path)))
    messages.append(_message(lambda: datasets.load_image_folder(tmp_path / "none")))
    messages.append(_message(lambda: datasets.folder_images(tmp_path)))
    messages.append(_message(lambda: datasets.read_fashion_mnist(root=tmp_path)))
    with pytest.raises(gr.Error) as err, common.user_errors():
        datasets.read_fashion_mnist(root=tmp_path)
    messages.append(str(err.value))
    # saving a fine-tune where the disk refuses it
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(session_context, "finetuned_dir", lambda: blocked)
    result = FinetuneResult(odd_vit.odd_vit(), ["a", "b"], (64, 64))
    with pytest.raises(gr.Error) as err, common.user_errors():
        session_context.context("s").save_model(
            "label", lambda out: save_checkpoint(result, out, OPERATOR_MODEL, FinetuneConfig()))
    messages.append(str(err.value))
    # The loaders' own messages name a folder at most (Fashion-MNIST's names its install
    # folder for the operator: `user_errors` strips it for visitors, checked below).
    for message in messages[:-3]:
        assert str(tmp_path) not in message, message
    for message in messages[-2:]:  # what the UI shows: no path at all
        assert_names_no_path(message)


# ---------------------------------------------------------------------------------------
# The registry, by hand
# ---------------------------------------------------------------------------------------


def limits(**changes) -> SessionLimits:
    """The default limits with ``changes``."""
    return replace(SessionLimits.from_settings(), **changes)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _checkpoint(root: Path, name: str, nbytes: int = 1000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * nbytes)
    return d


def test_a_session_sees_and_loads_only_its_own(tmp_path):
    reg = SessionModels(limits())
    ckpt = _checkpoint(tmp_path, "a")
    reg.add("alice", "fine-tuned: a-1234", ckpt)
    assert reg.names("alice") == ["fine-tuned: a-1234"] and reg.names("bob") == []
    assert resolve_web_name("fine-tuned: a-1234", "alice", reg) == f"local:{ckpt}"
    with pytest.raises(ModelUnavailableError, match="private") as err:
        resolve_web_name("fine-tuned: a-1234", "bob", reg)
    assert_names_no_path(str(err.value))
    shared = SessionModels(limits(shared=True))
    shared.add("presenter", "fine-tuned: p", _checkpoint(tmp_path, "p"))
    assert shared.names("student") == ["fine-tuned: p"]
    assert shared.lookup("student", "fine-tuned: p") is not None


def test_end_deletes_files_and_drops_the_loaded_model(tmp_path):
    deleted = []
    reg = SessionModels(limits(), on_delete=deleted.append)
    ckpt, extra = _checkpoint(tmp_path, "a"), tmp_path / "download"
    extra.mkdir()
    reg.add("alice", "m", ckpt, files=[extra])
    reg.add("bob", "n", _checkpoint(tmp_path, "b"))
    assert reg.end("alice") == ["m"]
    assert not ckpt.exists() and not extra.exists() and (tmp_path / "b").exists()
    assert [m.name for m in deleted] == ["m"] and reg.names("alice") == []


def test_model_cache_drops_a_deleted_model(tmp_path):
    ckpt = tmp_path / "odd"
    odd_vit.save_odd_vit(ckpt)
    reg = SessionModels(limits(), on_delete=sessions._forget_loaded)
    name = reg.add("alice", "fine-tuned: odd-x", ckpt).load_name
    models.load_vit(name, device="cpu")
    assert any(str(k).startswith(f"{name}@") for k in models.MODEL_CACHE.keys())
    reg.end("alice")
    assert not any(str(k).startswith(f"{name}@") for k in models.MODEL_CACHE.keys())


def test_idle_sessions_expire(tmp_path):
    clock = Clock()
    reg = SessionModels(limits(idle_s=60), clock=clock)
    reg.add("alice", "m", _checkpoint(tmp_path, "a"))
    reg.add("bob", "n", _checkpoint(tmp_path, "b"))
    clock.now = 50
    reg.names("bob")  # bob is active, alice is not
    clock.now = 100
    assert reg.sweep() == ["m"]
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_per_session_cap_and_global_quota_evict_the_oldest(tmp_path):
    reg = SessionModels(limits(per_session=2, quota_bytes=3500))
    for i in range(3):
        reg.add("alice", f"a{i}", _checkpoint(tmp_path, f"a{i}"))
    assert reg.names("alice") == ["a1", "a2"] and not (tmp_path / "a0").exists()
    reg.add("bob", "b0", _checkpoint(tmp_path, "b0"))  # 3000 bytes: fits
    reg.add("bob", "b1", _checkpoint(tmp_path, "b1"))  # 4000 > 3500: the oldest (a1) goes
    assert reg.names("alice") == ["a2"] and reg.names("bob") == ["b0", "b1"]
    assert reg.total_bytes() <= 3500 and not (tmp_path / "a1").exists()
    reg.add("carol", "huge", _checkpoint(tmp_path, "huge", 10_000))  # never evicts itself
    assert reg.names("carol") == ["huge"] and reg.names("alice") == reg.names("bob") == []


def test_a_session_saves_its_model_once_and_leaves_nothing_behind_when_it_cannot(
        tmp_path, monkeypatch):
    monkeypatch.setattr(session_context, "finetuned_dir", lambda: tmp_path)
    ctx = session_context.context("saving-session")

    def half_written(out: Path) -> Path:  # the disk fills up halfway through
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    with pytest.raises(session_context.ModelSaveError, match="No space left on device"):
        ctx.save_model("label", half_written, downloads=tmp_path / "downloads")
    assert list((tmp_path / "sessions").iterdir()) == []
    assert ctx.model_names() == models.model_names()  # nothing registered

    def written(out: Path) -> Path:
        odd_vit.save_odd_vit(out)
        return out

    saved = ctx.save_model("label", written, downloads=tmp_path / "downloads")
    assert saved.name.startswith("fine-tuned: label-") and saved.name in ctx.model_names()
    assert saved.checkpoint.parent.parent == tmp_path / "sessions"  # a random folder each
    assert (saved.checkpoint / "config.json").is_file() and saved.download.is_file()
    assert re.fullmatch(r"vit-explorer-ckpt-[\w-]{16,}", saved.download.parent.name)
    ctx.end()
    assert not saved.checkpoint.exists() and not saved.download.exists()
    assert saved.name not in ctx.model_names()


def test_limits_come_from_the_settings():
    env = {"VIT_EXPLORER_FINETUNE_QUOTA_MB": "1.5", "VIT_EXPLORER_FINETUNES_PER_SESSION": "2",
           "VIT_EXPLORER_SESSION_IDLE_S": "30", "VIT_EXPLORER_SHARE_FINETUNES": "1",
           "VIT_EXPLORER_MAX_HUB_MB": "10", "VIT_EXPLORER_WEB_HUB": "0"}
    assert SessionLimits.from_settings(Settings.from_env(env)) == SessionLimits(
        int(1.5 * (1 << 20)), 2, 30.0, True, 10.0, False)


# ---------------------------------------------------------------------------------------
# The running app
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    operator = tmp_path_factory.mktemp("operator-models")
    odd_vit.save_odd_vit(operator / OPERATOR_MODEL)
    data = tmp_path_factory.mktemp("operator-data")
    (data / OPERATOR_DATA).mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 60, 10, 10)).save(data / OPERATOR_DATA / f"{i}.png")
    demo = app.build_demo(replace(Settings.from_env(), models_dir=operator, data_dir=data))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield demo
    demo.close()


def _client(demo) -> Client:
    return Client(demo.local_url, verbose=False)


def _refused(call, typed: str = "") -> str:
    """The call's error message, checked to name no server path. (gradio's own choice check
    may echo what was typed: the visitor's input, not the server's, so it is left out.)"""
    with pytest.raises(Exception) as err:  # noqa: PT011 (gradio_client's AppError)
        call()
    message = str(err.value)
    assert_names_no_path(message.replace(repr(typed), "") if typed else message)
    return message


def _zip(path: Path, entries: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return str(path)


def test_paths_typed_into_any_field_are_refused(demo, tmp_path):
    client = _client(demo)
    image = handle_file(IMAGE)
    for name in ["/etc", "local:/etc", "local:" + str(tmp_path), "../../etc"]:
        msg = _refused(lambda n=name: client.predict(image, n, 0, 0, "crop", api_name="/tokens"))
        assert "not accepted" in msg
        _refused(lambda n=name: client.predict(image_path=image, model_name=n,
                                               api_name="/attention"))
        _refused(lambda n=name: client.predict(image, n, [], False, False, 0, 0, "crop", "drop",
                                               None, api_name="/distance"))
        _refused(lambda n=name: client.predict(image, models.DEFAULT_MODEL, [n], False, False,
                                               0, 0, "crop", "drop", None, api_name="/distance"),
                 typed=name)
        _refused(lambda n=name: client.predict(n, "bundled examples", 4, None, 0, 0, "drop",
                                               api_name="/distance_dataset"))
        _refused(lambda n=name: client.predict("Built-in Fashion-MNIST", None, 50, n,
                                               "Linear probe (frozen backbone)", 1, 64, 1, 0, 16,
                                               0, api_name="/finetune"))
        _refused(lambda n=name: client.predict("Built-in Fashion-MNIST", None, 50, n, 64,
                                               api_name="/finetune_layerwise"))
    for name in ["/etc", "assets/igpt", "~/x", "./assets/igpt", str(tmp_path)]:
        _refused(lambda n=name: client.predict(image, n, api_name="/igpt_analyse"))
    # The distance band takes an uploaded zip, never a folder; its errors name no path.
    for entries, why in [({"x.txt": b"text"}, "No readable images"),
                         ({"../../etc/x.png": b"x"}, "climbs out"),
                         ({"/etc/x.png": b"x"}, "absolute")]:
        upload = handle_file(_zip(tmp_path / "band.zip", entries))
        msg = _refused(lambda u=upload: client.predict(models.DEFAULT_MODEL, "uploaded zip", 4, u,
                                                       0, 0, "drop", api_name="/distance_dataset"),
                       typed=next(iter(entries)))  # the zip's own entry name may be echoed
        assert re.search(why, msg), msg
    _refused(lambda: client.predict(models.DEFAULT_MODEL, "folder", 4, None, 0, 0, "drop",
                                    api_name="/distance_dataset"))
    # The fine-tune tab's zip: the same ingestion, the same rule.
    upload = handle_file(_zip(tmp_path / "ft.zip", {"/etc/passwd.png": b"x"}))
    _refused(lambda: client.predict("Upload a zip", upload, 50, api_name="/finetune_data"))
    client.close()


def test_operator_models_appear_by_name(demo):
    client = _client(demo)
    assert OPERATOR_MODEL in _choices(client)
    summary = client.predict(handle_file(IMAGE), OPERATOR_MODEL, 0, 0, "crop",
                             api_name="/tokens")[0]
    assert "4x4" in summary
    client.close()


def _choices(client) -> list[str]:
    return [c[0] for c in client.predict([], api_name="/distance_models")["choices"]]


def _train(client) -> tuple[str, Path]:
    *_, summary, _confusion, _grid, _pos, download = client.predict(
        "Built-in Fashion-MNIST", None, 50, OPERATOR_MODEL, "Linear probe (frozen backbone)", 1,
        64, 1, 0, 16, 0, api_name="/finetune")
    name = re.search(r"Saved as \*\*(fine-tuned: [^*]+)\*\*", summary).group(1)
    return name, Path(download)


def _session_files(name: str) -> tuple[Path, ...]:
    model = next(m for m in sessions.FINETUNES._models.values() if m.name == name)
    return model.files


def _wait_gone(paths, timeout=15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(p.exists() for p in paths):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_fine_tunes_are_private_and_deleted_when_the_session_ends(demo):
    alice, bob = _client(demo), _client(demo)
    name, download = _train(alice)
    assert name.startswith("fine-tuned: ") and download.is_file()
    files = _session_files(name)
    assert all(p.exists() for p in files)
    assert name in _choices(alice) and name not in _choices(bob)
    summary = alice.predict(handle_file(IMAGE), name, 0, 0, "crop", api_name="/tokens")[0]
    assert "4x4" in summary
    msg = _refused(lambda: bob.predict(handle_file(IMAGE), name, 0, 0, "crop", api_name="/tokens"))
    assert "private" in msg
    # the distance tab's overlay picker offers it to alice (its choices follow her session)
    _plot, _erf, info, message = alice.predict(handle_file(IMAGE), OPERATOR_MODEL, [name], False,
                                               False, 0, 0, "crop", "drop", None,
                                               api_name="/distance")
    assert "images/s" in info and message == ""  # a run that worked empties the message box
    _refused(lambda: bob.predict(handle_file(IMAGE), OPERATOR_MODEL, [name], False, False, 0, 0,
                                 "crop", "drop", None, api_name="/distance"), typed=name)
    # bob cannot reach alice's download either: its folder has a random name
    assert re.search(r"vit-explorer-ckpt-[\w-]{16,}", str(files[-1]))
    alice.close()  # the heartbeat ends: gradio's unload event deletes alice's files
    assert _wait_gone(files)
    assert name not in [m.name for m in sessions.FINETUNES._models.values()]
    bob.close()


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_idle_timeout_and_quota_through_the_app(demo, monkeypatch):
    # The registry is process-wide: earlier tests' sessions must not hold part of the quota
    # (eviction takes the oldest model first, which would then be theirs, not alice's).
    for leftover in {m.session for m in sessions.FINETUNES._models.values()}:
        sessions.FINETUNES.end(leftover)
    alice, bob = _client(demo), _client(demo)
    first, _ = _train(alice)
    first_files = _session_files(first)
    size = sessions.FINETUNES.total_bytes()
    monkeypatch.setattr(sessions.FINETUNES, "limits",
                        replace(sessions.FINETUNES.limits, quota_bytes=int(1.5 * size)))
    second, _ = _train(bob)  # two do not fit: the oldest (alice's) goes
    assert _wait_gone(first_files, timeout=1) and first not in _choices(alice)
    assert second in _choices(bob)
    monkeypatch.setattr(sessions.FINETUNES, "limits", replace(sessions.FINETUNES.limits, idle_s=1))
    second_files = _session_files(second)
    assert _wait_gone(second_files)  # bob idles: the sweeper deletes his model
    assert second not in [m.name for m in sessions.FINETUNES._models.values()]
    alice.close()
    bob.close()


def test_distance_band_from_an_uploaded_zip_or_an_operator_folder(demo, tmp_path):
    client = _client(demo)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    upload = handle_file(_zip(tmp_path / "band.zip", {f"p/{i}.png": buffer.getvalue()
                                                      for i in range(4)}))
    info = client.predict(OPERATOR_MODEL, "uploaded zip", 4, upload, 0, 0, "drop",
                          api_name="/distance_dataset")  # the band itself is a gr.State
    assert "4 images (uploaded zip)" in info
    info = client.predict(OPERATOR_MODEL, f"data: {OPERATOR_DATA}", 4, None, 0, 0, "drop",
                          api_name="/distance_dataset")
    assert f"3 images (data: {OPERATOR_DATA})" in info
    client.close()
