"""A streaming multi-turn chat in the terminal; an empty line or end of input quits.

    python examples/chat.py [MODEL_DIR_OR_HF_REPO] [--no-think]

The decoding cache is kept between turns: when the new turn's tokens extend what the
cache already holds, only the new tokens are run through the model.
"""

import sys

from mlx_lm.sample_utils import make_sampler

from mlx_qwenmoe import load, stream_generate
from mlx_qwenmoe.api import chat_prompt

args = [a for a in sys.argv[1:] if a != "--no-think"]
thinking = False if "--no-think" in sys.argv[1:] else None
model, tokenizer = load(args[0] if args else None)
sampler = make_sampler(temp=0.7, top_p=0.9)

messages = []
cache, seen = model.make_cache(), []
while True:
    try:
        user = input(">> ")
    except EOFError:
        break
    if not user.strip():
        break
    messages.append({"role": "user", "content": user})
    prompt = chat_prompt(tokenizer, messages, enable_thinking=thinking)
    if prompt[: len(seen)] != seen or len(prompt) == len(seen):
        # The template re-rendered history differently (e.g. it drops old thinking): start over.
        cache, seen = model.make_cache(), []
    reply = []
    for response in stream_generate(model, tokenizer, prompt[len(seen):], max_tokens=512, sampler=sampler, cache=cache):
        print(response.text, end="", flush=True)
        reply.append(response)
    print()
    # The cache now holds the prompt and every generated token (the eos included).
    seen = prompt + [r.token for r in reply]
    messages.append({"role": "assistant", "content": "".join(r.text for r in reply)})
