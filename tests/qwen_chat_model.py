"""The bundled demo model with a chat template that renders tools and thinking as Qwen3.5's does.

The demo checkpoint's own template is minimal (no tools, no think block in the prompt);
this copy swaps in ``fixtures/qwen3_5_style_chat_template.jinja`` so the server's tool and
thinking paths run against the real weights and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_qwenmoe.api import default_model_dir

TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3_5_style_chat_template.jinja"


def make_qwen_chat_model_dir(dest: Path) -> Path:
    """A model directory at ``dest``: the demo weights linked, the tokenizer config rewritten."""
    src = default_model_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (dest / name).symlink_to(src / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE.read_text()
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def load_qwen_chat_tokenizer(model_dir: Path):
    """The directory's tokenizer as the server loads it (mlx-lm's wrapper, tool parser inferred)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(Path(model_dir))
