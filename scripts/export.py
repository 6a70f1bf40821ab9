"""Deploy bundle: one directory with the policy, its LYNX probe and its Dr.LLM router.

    python scripts/export.py --policy runs/grpo/final --probe runs/lynx --router runs/drllm/router --out bundle/

Layout and checks: ``deploy/bundle.py``. Load it with ``deploy.decoder.EfficientDecoder.from_pretrained``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deploy.bundle import MANIFEST, BundleError, export_bundle, verify_bundle  # noqa: E402,F401


def main(argv=None) -> int:
    from train.cli import _OneLineParser

    ap = _OneLineParser(prog="export.py", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--policy", required=True, help="trained policy: checkpoint/final dir, LoRA adapter dir, HF id")
    ap.add_argument("--probe", default=None, help="LYNX export directory (train/lynx_probe.py --output_dir)")
    ap.add_argument("--router", default=None, help="Dr.LLM router export directory (runs/drllm/router)")
    ap.add_argument("--out", required=True, help="bundle directory to write")
    ap.add_argument("--keep_adapter", action="store_true", help="LoRA policy: keep the adapter (adapter/) "
                    "next to the base model instead of merging it")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    from algos.models import ModelLoadError

    try:
        out = export_bundle(args.policy, args.out, args.probe, args.router, args.keep_adapter, args.overwrite)
    except (BundleError, ModelLoadError, OSError) as exc:
        print(f"export.py: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST).read_text())  # just written and hashed; no second pass
    parts = [k for k, v in manifest["parts"].items() if v]
    print(f"wrote {out}: {', '.join(parts)}; {len(manifest['files'])} files hashed in {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
