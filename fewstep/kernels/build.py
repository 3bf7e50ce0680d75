"""``python -m fewstep.kernels.build``: compile the fused attention JVP now (on a GPU machine) instead of on first
use; prints where it is cached, or why it cannot be built."""

from __future__ import annotations

import sys

from fewstep.kernels import cuda


def main() -> int:
    reason = cuda.build_reason()
    if reason is not None:
        print(f"Not building the fused attention JVP: {reason}. The PyTorch reference will be used.")
        return 1
    ext = cuda.load_extension(verbose=True)
    print(f"Built {cuda.EXTENSION_NAME}: {ext.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
