"""``python -m egalitarian_rl.labelling CONFIG [--host H] [--port P] [--export FILE]``: what ``egalitarian-rl label`` runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from egalitarian_rl.labelling.campaign import label_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m egalitarian_rl.labelling", description="Serve a labelling campaign's web page.")
    parser.add_argument("config", help="the campaign's YAML file")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--export", default=None, help="write the answers as a PreferenceDataset .npz and exit")
    args = parser.parse_args(argv)
    return label_main(args.config, host=args.host, port=args.port, export=args.export)


if __name__ == "__main__":
    sys.exit(main())
