"""Use a compiled tsedge library from an app, with the TVM runtime only (no compiler loaded).

    TVM_USE_RUNTIME_LIB=1 python examples/app.py LIB.so MODEL "Your question"

LIB.so comes from ``tsedge compile`` (its .json metadata beside it); MODEL is the weights it was
compiled for (a GGUF file or a Hugging Face folder). The reply streams to stdout as it is decoded.
"""

import sys

from tsedge.engine import Engine
from tsedge.sampling import SamplingParams


def main(lib: str, model: str, question: str) -> None:
    engine = Engine(lib, model)  # loads the library, its weights and their tokenizer
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    text = engine.tokenizer.stream(skip_special_tokens=True)  # ids -> text, whole characters only

    def show(token: int) -> None:
        print(text.push(token), end="", flush=True)

    result = engine.generate(prompt, max_new_tokens=128, sampling=SamplingParams(temperature=0.0), on_token=show)
    print(text.flush())
    print(f"[{len(result.tokens)} tokens, {result.decode_tok_per_s:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python examples/app.py LIB.so MODEL \"Your question\"")
    try:
        main(*sys.argv[1:])
    except (OSError, ValueError) as e:  # LibraryError, WeightsError and a missing file are ValueError/OSError
        sys.exit(f"error: {e}")
