"""Load a model and generate, greedily and then sampled with streaming.

    python examples/api_example.py [MODEL_DIR_OR_HF_REPO]

Without an argument it uses the demo model shipped inside the package.
"""

import sys

from mlx_lm.sample_utils import make_sampler

from mlx_qwenmoe import generate, load, stream_generate

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else None)

print(generate(model, tokenizer, "def fibonacci(n):", max_tokens=64))

sampler = make_sampler(temp=0.7, top_p=0.9)
for response in stream_generate(model, tokenizer, "import os\n", max_tokens=64, sampler=sampler, stop=["\n\n"]):
    print(response.text, end="", flush=True)
print()
print(
    f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tokens/s, "
    f"finished by {response.finish_reason}, peak memory {response.peak_memory:.3f} GB"
)
