"""A multi-turn chat on a prompt cache: each turn reuses what earlier turns computed, even where
the chat template renders earlier turns differently (Qwen3.5 drops old thinking)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO, Union

from .api import chat_prompt_with_boundaries
from .errors import PromptCacheError
from .generate import GenerationResponse, stream_generate
from .prompt_cache import PromptCache

__all__ = ["ChatSession", "run_repl"]


class ChatSession:
    """The conversation so far and the prompt cache its turns run on (a new one with the
    default budget when None). ``generation`` holds ``stream_generate``'s keyword arguments
    (max_tokens, sampler, mtp, ...)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: Optional[str] = None,
        enable_thinking: Optional[bool] = None,
        prompt_cache: Optional[PromptCache] = None,
        **generation: Any,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.enable_thinking = system, enable_thinking
        self.generation = generation
        self.cache = prompt_cache if prompt_cache is not None else PromptCache(model)
        self.messages: List[Dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the prompt cache stays (a new conversation reuses the system prompt)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    def save(self, path: Union[str, Path]) -> None:
        self.cache.save(path)

    def load(self, path: Union[str, Path]) -> None:
        """Replace the prompt cache with the file's; on a PromptCacheError the current one stays."""
        self.cache = PromptCache.load(path, self.model, self.cache.max_bytes)

    def turn(self, user: str) -> Iterator[GenerationResponse]:
        """Stream the reply to ``user``; the reply joins the conversation once it is complete."""
        messages = self.messages + [{"role": "user", "content": user}]
        ids, boundaries = chat_prompt_with_boundaries(self.tokenizer, messages, self.enable_thinking)
        pieces = []
        for response in stream_generate(
            self.model, self.tokenizer, ids, prompt_cache=self.cache, boundaries=boundaries, **self.generation
        ):
            pieces.append(response.text)
            yield response
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]


def run_repl(session: ChatSession, read: Callable[[str], str], out: TextIO, err: TextIO) -> None:
    """Read turns with ``read`` (``input``-like; EOFError or an empty line ends), stream replies
    to ``out``, and after each turn write "N prompt tokens, M reused" to ``err``. Commands:
    /reset, /save FILE, /load FILE."""
    while True:
        try:
            line = read(">> ")
        except EOFError:
            break
        if not line.strip():
            break
        command, _, arg = line.strip().partition(" ")
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=err)
        elif command in ("/save", "/load"):
            if not arg.strip():
                print(f"{command} needs a file name", file=err)
                continue
            try:
                (session.save if command == "/save" else session.load)(arg.strip())
                done = "saved to" if command == "/save" else "loaded"
                print(f"({done} {arg.strip()}: {session.cache.nbytes} bytes)", file=err)
            except (PromptCacheError, OSError) as e:
                print(f"{command}: {e}", file=err)
        else:
            response = None
            for response in session.turn(line):
                print(response.text, end="", flush=True, file=out)
            print(file=out)
            if response is not None:
                print(f"{response.prompt_tokens} prompt tokens, {response.cached_tokens} reused", file=err, flush=True)
