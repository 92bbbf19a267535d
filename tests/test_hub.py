"""The online path for real: catalogue and typed hub names through huggingface_hub, timm and
transformers' own download code, against a local stand-in for the Hugging Face hub
(`tests.hub_helpers.StandInHub`), and the clear message when no hub can be reached.

The stand-in serves tiny models the tests make here, under the names the app asks for:

- ``timm/test_vit.r160_in1k``: weights for timm's registered ``test_vit`` (what timm fetches
  for a registry name: only ``model.safetensors``), behind a catalogue entry;
- ``someone/tiny-vit``: a repo in timm's layout (`save_for_hf`), typed as ``hf-hub:...``;
- ``openai/imagegpt-small`` (the real catalogue name) and ``someone/tiny-igpt`` (typed):
  2-layer ImageGPTs saved by transformers, with their image processor's clusters.

Each scenario runs in a fresh interpreter (`run_python`), because huggingface_hub reads
``HF_ENDPOINT`` at import.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tests.hub_helpers import StandInHub, closed_port_url, run_python

VIT_CATALOGUE = "tiny ViT (stand-in hub)"
VIT_REGISTRY = "test_vit.r160_in1k"  # timm's pretrained_cfg: hf_hub_id timm/test_vit.r160_in1k
VIT_TYPED = "someone/tiny-vit"
IGPT_CATALOGUE = "openai/imagegpt-small"
IGPT_TYPED = "someone/tiny-igpt"
LABELS = ["cat", "dog", "bird"]

# Runs in the child: load every model by name, record their outputs on the test's inputs;
# then ask for a repo the hub does not have.
LOAD_ALL = textwrap.dedent(f"""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from explorer import models
    from explorer.igpt.checkpoint import load_igpt

    inputs = load_file(sys.argv[1])
    models.CATALOGUE[{VIT_CATALOGUE!r}] = models.CatalogueEntry(
        {VIT_CATALOGUE!r}, {VIT_REGISTRY!r}, "hub", "timm's test ViT from the stand-in hub")
    out, info = {{}}, {{}}
    for name in ({VIT_CATALOGUE!r}, "hf-hub:{VIT_TYPED}"):
        model, config = models.load_vit(name, device="cpu")
        assert models.load_vit(name, device="cpu")[0] is model  # cached: no second download
        with torch.no_grad():
            out[name] = model(inputs["pixels"])
        info[name] = {{"class_names": getattr(model, "class_names", None),
                       "input_size": list(config["input_size"])}}
    for name in ({IGPT_CATALOGUE!r}, {IGPT_TYPED!r}):
        m = load_igpt(name)
        with torch.no_grad():
            out[name] = m.model(inputs["tokens"])
        info[name] = {{"size": [m.height, m.width], "colours": m.palette.size}}
    try:  # the hub answers, but has no such repo
        models.load_vit("hf-hub:someone/not-there", device="cpu")
    except models.ModelUnavailableError as err:
        info["not-there"] = str(err)
    save_file({{k: v.contiguous() for k, v in out.items()}}, sys.argv[2])
    print(json.dumps(info))
""")

# Runs in the child with no reachable hub: names it has never fetched fail with the one error
# and a message for people; names already in its Hugging Face cache still load.
OFFLINE = textwrap.dedent(f"""
    import json, time
    from explorer import models
    from explorer.errors import ModelUnavailableError
    from explorer.igpt.checkpoint import load_igpt

    result = {{"errors": {{}}, "loaded": []}}
    for kind, load, name in [
        ("vit", models.load_vit, "deit_small_patch16_224.fb_in1k"),  # catalogue, hub
        ("vit", models.load_vit, "hf-hub:someone/never-published"),
        ("igpt", load_igpt, "openai/imagegpt-medium"),  # catalogue, hub
        ("igpt", load_igpt, "someone/never-published"),
        ("vit", models.load_vit, "hf-hub:{VIT_TYPED}"),  # cached by an earlier online run
        ("igpt", load_igpt, {IGPT_CATALOGUE!r}),
    ]:
        start = time.monotonic()
        try:
            load(name)
        except ModelUnavailableError as err:
            result["errors"][name] = [str(err), time.monotonic() - start]
        else:
            result["loaded"].append(name)
    print(json.dumps(result))
""")


def _last_json_line(done) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_igpt(seed: int):
    """A 2-layer transformers ImageGPT: 16 colours + start token, 6x6 images."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(seed)
    config = ImageGPTConfig(vocab_size=17, n_positions=36, n_embd=32, n_layer=2, n_head=4)
    return ImageGPTForCausalImageModeling(config).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The stand-in hub with its four repos, the test inputs and the reference outputs."""
    from transformers import ImageGPTImageProcessor

    from explorer.igpt.model import ImageGPT

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    reference, inputs = {}, {"pixels": torch.rand(2, 3, 160, 160) * 2 - 1,
                             "tokens": torch.randint(0, 17, (2, 36))}

    registry = timm.create_model("test_vit", pretrained=False).eval()
    (root / "registry").mkdir()
    save_file(registry.state_dict(), str(root / "registry" / "model.safetensors"))
    typed = timm.create_model("test_vit", pretrained=False, num_classes=len(LABELS)).eval()
    timm.models.save_for_hf(typed, str(root / "typed"), model_config={"label_names": LABELS},
                            safe_serialization=True)
    with torch.no_grad():
        reference[VIT_CATALOGUE] = registry(inputs["pixels"])
        reference[f"hf-hub:{VIT_TYPED}"] = typed(inputs["pixels"])

    for seed, name in enumerate((IGPT_CATALOGUE, IGPT_TYPED)):
        hf = tiny_igpt(seed)
        directory = root / name.replace("/", "--")
        hf.save_pretrained(directory)
        clusters = torch.rand(16, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        ImageGPTImageProcessor(clusters=clusters.tolist(),
                               size={"height": 6, "width": 6}).save_pretrained(directory)
        with torch.no_grad():
            reference[name] = ImageGPT.from_hf(hf)(inputs["tokens"])

    save_file(inputs, str(root / "inputs.safetensors"))
    with StandInHub() as hub:
        hub.add_repo(f"timm/{VIT_REGISTRY}", root / "registry")
        hub.add_repo(VIT_TYPED, root / "typed")
        hub.add_repo(IGPT_CATALOGUE, root / IGPT_CATALOGUE.replace("/", "--"))
        hub.add_repo(IGPT_TYPED, root / IGPT_TYPED.replace("/", "--"))
        yield hub, root, reference


@pytest.fixture(scope="module")
def online(served):
    """One child process loads every served model by name through the stand-in hub."""
    hub, root, reference = served
    done = run_python(LOAD_ALL, hub.url, root / "hf-home",
                      args=[root / "inputs.safetensors", root / "outputs.safetensors"])
    return _last_json_line(done), load_file(str(root / "outputs.safetensors"))


def test_hub_names_download_through_the_real_clients(served, online):
    hub, _, reference = served
    info, outputs = online
    for name, expected in reference.items():  # the very weights the stand-in served
        torch.testing.assert_close(outputs[name], expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # timm fetched only the weights for a registry name, config + weights for an hf-hub repo,
    # each once (the second load_vit was served by the model cache).
    assert hub.downloads(f"timm/{VIT_REGISTRY}") == ["model.safetensors"]
    assert sorted(hub.downloads(VIT_TYPED)) == ["config.json", "model.safetensors"]
    for repo in (IGPT_CATALOGUE, IGPT_TYPED):  # transformers: model, config, image processor
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(
            hub.downloads(repo))
    # What travels with the weights arrives too: class names, input size, palette, image size.
    assert info[f"hf-hub:{VIT_TYPED}"]["class_names"] == LABELS
    assert info[VIT_CATALOGUE]["input_size"] == [3, 160, 160]
    assert info[IGPT_CATALOGUE] == {"size": [6, 6], "colours": 16}


def test_unknown_repo_on_a_reachable_hub_is_a_clear_error(online):
    message = online[0]["not-there"]
    assert "someone/not-there" in message and "has no" in message and "internet" not in message


def test_without_a_hub_the_offline_message_and_the_cache(served, online):
    """No server (a closed port): names never fetched fail fast with the one error and a
    message for people; the models the online run fetched load from the cache."""
    _, root, _ = served
    result = _last_json_line(run_python(OFFLINE, closed_port_url(), root / "hf-home"))
    errors = result["errors"]
    assert set(errors) == {"deit_small_patch16_224.fb_in1k", "hf-hub:someone/never-published",
                           "openai/imagegpt-medium", "someone/never-published"}
    for name, (message, seconds) in errors.items():
        assert seconds < 30, f"{name} took {seconds:.0f} s to fail"
        assert "internet" in message and "Traceback" not in message
        assert name.removeprefix("hf-hub:") in message
        assert "default model" in message  # what to do instead
    assert result["loaded"] == [f"hf-hub:{VIT_TYPED}", IGPT_CATALOGUE]


def test_every_hub_catalogue_entry_is_what_the_stand_in_exercises():
    """The stand-in serves one registry ViT and one OpenAI repo name; every hub entry of both
    catalogues takes the same path: a timm name whose weights live in a hub repo, or a repo."""
    from explorer import models
    from explorer.igpt.checkpoint import CATALOGUE as IGPT_CATALOGUE_ENTRIES

    hub_vits = [e for e in models.CATALOGUE.values() if e.source == "hub"]
    assert hub_vits
    for entry in hub_vits:
        cfg = timm.models.get_pretrained_cfg(entry.architecture)
        assert cfg is not None and cfg.hf_hub_id, entry.name
    hub_igpts = [s for s in IGPT_CATALOGUE_ENTRIES.values() if s.source == "hub"]
    assert IGPT_CATALOGUE in {s.location for s in hub_igpts}
    assert all(s.location.count("/") == 1 for s in hub_igpts)


# Runs in the child: the web pickers' checks of typed hub names, before any download.
WEB_LIMITS = textwrap.dedent(f"""
    import json
    from dataclasses import replace
    from explorer import sessions
    from explorer.errors import ModelUnavailableError

    out = {{}}
    def attempt(key, fn, *args):
        try:
            fn(*args)
            out[key] = "ok"
        except ModelUnavailableError as err:
            out[key] = str(err)

    def all_three(tag):
        attempt("vit-" + tag, sessions.resolve_web_name, "hf-hub:{VIT_TYPED}", "s1")
        attempt("registry-" + tag, sessions.resolve_web_name, {VIT_REGISTRY!r}, "s1")
        attempt("igpt-" + tag, sessions.resolve_igpt_web_name, {IGPT_TYPED!r}, {{}}, "x")

    all_three("default")
    limits = sessions.FINETUNES.limits  # as the app sets them (Settings.max_hub_mb, web_hub)
    sessions.FINETUNES.limits = replace(limits, hub_mb=0.001)  # 1 kB: less than any model
    all_three("capped")
    sessions.FINETUNES.limits = replace(limits, web_hub=False)
    all_three("off")
    print(json.dumps(out))
""")


def test_typed_hub_models_too_big_for_the_server_are_refused_before_downloading(
        served, tmp_path):
    hub, _, _ = served
    before = len(hub.requests)
    out = _last_json_line(run_python(WEB_LIMITS, hub.url, tmp_path / "hf-home"))
    assert out["vit-default"] == out["registry-default"] == out["igpt-default"] == "ok"
    for kind, name in (("vit", VIT_TYPED), ("registry", VIT_REGISTRY), ("igpt", IGPT_TYPED)):
        capped = out[f"{kind}-capped"]
        assert name in capped and "MB download" in capped and "up to 0.001 MB" in capped
        assert "/" not in capped.replace(name, "")  # no path, only the name typed
        assert "only offers the models in its list" in out[f"{kind}-off"]
    # the checks asked with HEAD requests only: nothing was downloaded
    assert {method for method, _ in hub.requests[before:]} == {"HEAD"}
