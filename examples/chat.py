"""A streaming multi-turn chat in the terminal; an empty line or end of input quits.

    python examples/chat.py [MODEL_DIR_OR_HF_REPO] [--no-think]

The library's ChatSession runs every turn on a prompt cache, so each turn computes only
what no earlier turn did, even when the chat template re-renders history (Qwen3.5 drops
old thinking). /reset, /save FILE and /load FILE work as in ``mlx_qwenmoe chat``, which
is this example with options.
"""

import sys

from mlx_qwenmoe import load
from mlx_qwenmoe.chat import ChatSession, run_repl
from mlx_qwenmoe.sampling import SamplerSpec

args = [a for a in sys.argv[1:] if a != "--no-think"]
thinking = False if "--no-think" in sys.argv[1:] else None
model, tokenizer = load(args[0] if args else None)
session = ChatSession(model, tokenizer, enable_thinking=thinking, max_tokens=512, sampler=SamplerSpec(temp=0.7, top_p=0.9))
run_repl(session, input, sys.stdout, sys.stderr)
