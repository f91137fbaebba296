"""Every checkpoint of the corpus in ``bad_checkpoints.py`` fails to load with its exact error line,
through the API and through ``mlx_qwenmoe generate``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from bad_checkpoints import CHAT_TEMPLATE, DAMAGE, copy_demo
from mlx_qwenmoe.api import chat_prompt, load
from mlx_qwenmoe.cli import main
from mlx_qwenmoe.errors import QwenMoeError


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_fails_with_its_line(kind, tmp_path):
    damage, line = DAMAGE[kind]
    d = copy_demo(tmp_path / "ckpt")
    damage(d)
    with pytest.raises(QwenMoeError) as info:
        load(d)
    assert str(info.value) == line.format(d=d)


@pytest.mark.parametrize("kind", ["config_is_dir", "expert_wrong_shape", "stray_duplicate", "tokenizer_invalid"])
def test_damaged_checkpoint_in_the_cli(kind, tmp_path):
    damage, line = DAMAGE[kind]
    d = copy_demo(tmp_path / "ckpt")
    damage(d)
    result = CliRunner().invoke(main, ["generate", "--model", str(d), "--prompt", "hi"])
    assert result.exit_code == 2
    assert [x for x in result.output.splitlines() if x.startswith("Error")] == [f"Error: {line.format(d=d)}"]


def test_chat_template_that_does_not_compile(tmp_path):
    damage, line = CHAT_TEMPLATE
    d = copy_demo(tmp_path / "ckpt")
    damage(d)
    _, tokenizer = load(d)
    with pytest.raises(QwenMoeError) as info:
        chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert str(info.value) == line
