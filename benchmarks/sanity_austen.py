"""The sanity check of docs/FLAP.md: SmolLM2-135M (fp32), calibration 128 random windows of 128 tokens from
Austen's *Emma* (seed 0), perplexity on the first 128 windows of 128 tokens of *Persuasion*; dense, and FLAP
AL-AM/WIFV/bias at 20% and 50%. The reference implementation measured 54.76 / 72.33 (87 groups, 34,303
channels) / 293.6 (59 groups, 20,650 channels).

Austen's novels come from Debian's r-cran-janeaustenr (R's lazy-load database, read with PyPI rdata):
  apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/jane
  .venv/bin/pip install rdata
  .venv/bin/python benchmarks/sanity_austen.py --jane /tmp/jane
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flap_llm  # noqa: E402
from common import command_line, load  # noqa: E402
from flap_llm.calibration.data import sample_windows  # noqa: E402
from flap_llm.eval.evaluate import eval_windows, perplexity_of_windows  # noqa: E402


def austen(jane: Path) -> dict[str, str]:
    """The novels from janeaustenr's Rdata.rdb/.rdx (a gzip index and zlib-compressed serialized objects)."""
    import rdata
    data = next(jane.rglob("janeaustenr/data"))
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
    rdb = (data / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        blob = zlib.decompress(rdb[int(offset) + 4:int(offset) + int(length)])
        books[str(name)] = "\n".join(str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(blob)))
    return books


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jane", default="/tmp/jane", help="where r-cran-janeaustenr was extracted")
    args = ap.parse_args()
    books = austen(Path(args.jane))
    model, tok, _ = load("smollm2")
    ids = {k: tok(books[k], add_special_tokens=False, return_tensors="pt").input_ids[0] for k in ("emma", "persuasion")}
    calib = sample_windows(ids["emma"], 128, 128, 0)
    windows = eval_windows(ids["persuasion"], 128, None, 128)
    rows = [{"name": "dense", "ppl": perplexity_of_windows(model, windows, 16)["ppl"]}]
    for ratio in (0.2, 0.5):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        r = flap_llm.prune(m, calib, flap_llm.PruneConfig(ratio=ratio), batch_size=16)
        rows.append({"name": f"flap {ratio:.0%}", "ppl": perplexity_of_windows(m, windows, 16)["ppl"],
                     "kv_groups_kept": r.report["layers"]["kv_groups_kept"],
                     "channels_kept": r.report["layers"]["channels_kept"], "prune_s": time.perf_counter() - t})
    print(json.dumps({"rows": rows, "versions": r.report["versions"], "command": command_line()},
                     indent=2))


if __name__ == "__main__":
    main()
