"""Loading a Hub repo id: what the download brings is what ``load`` needs.

A fake ``snapshot_download`` serves a repository from a local folder through huggingface_hub's
own ``filter_repo_objects``, so it honours ``allow_patterns``/``ignore_patterns`` as the Hub
client does: a pattern list that forgot the weights, the tokenizer or the chat template fails here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, List

import huggingface_hub
from huggingface_hub.utils import filter_repo_objects

from mlx_qwenmoe.api import default_model_dir, load
from mlx_qwenmoe.generate import generate


def serve_repo(monkeypatch, repo_dir: Path, cache: Path) -> List[List[str]]:
    """Make ``snapshot_download`` copy the files of ``repo_dir`` that its patterns select; returns the
    list of file lists it served, one per call."""
    served: List[List[str]] = []

    def snapshot_download(repo_id: str, *, allow_patterns: Any = None, ignore_patterns: Any = None, **_: Any) -> str:
        files = [str(p.relative_to(repo_dir)) for p in sorted(repo_dir.rglob("*")) if p.is_file()]
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        out = cache / repo_id.replace("/", "--")
        for name in chosen:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo_dir / name, out / name)
        served.append(chosen)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return served


def test_repo_id_download_brings_everything_load_needs(monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(default_model_dir(), repo)
    (repo / "README.md").write_text("not needed")
    (repo / "pytorch_model.bin").write_bytes(b"never downloaded: pickle")
    served = serve_repo(monkeypatch, repo, tmp_path / "cache")

    model, tokenizer = load("example-org/qwen35-demo")
    assert served and "model.safetensors" in served[0] and "tokenizer.json" in served[0]
    assert "pytorch_model.bin" not in served[0]
    assert tokenizer.has_chat_template
    assert generate(model, tokenizer, "def f(x):", max_tokens=4)
