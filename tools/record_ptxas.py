"""Record the registers and shared memory of every kernel instantiation as nvcc 13.0 compiles it for sm_90.

Chapter 05 models occupancy and bytes in flight from these counts. Other nvcc versions allocate registers
differently (Colab's CUDA 12, say), and a machine without nvcc has none, so the counts the chapter's prose
quotes ship as package data, bnlib/data/ptxas_sm90_nvcc13.0.json, with the SHA-256 of the kernel source they
were compiled from; the chapter refuses a recording of other kernels and compares it with the live nvcc 13.0
where there is one. Rerun this after changing the kernels (it needs nvcc 13.0 and no GPU):

    python tools/record_ptxas.py
"""
import argparse
import datetime
import hashlib
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnlib import cuda  # noqa: E402


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None or cuda.nvcc_version(nvcc) != (13, 0):
        sys.exit(f"needs nvcc 13.0 on the PATH, found {nvcc and cuda.nvcc_version(nvcc)}")
    usage = cuda.ptxas_usage("sm_90")
    record = {"nvcc": "13.0", "arch": "sm_90", "date": datetime.date.today().isoformat(),
              "source_sha256": hashlib.sha256(cuda.instantiation_source().encode()).hexdigest(),
              "usage": {name: list(v) for name, v in sorted(usage.items())}}
    out = ROOT / "bnlib" / "data" / cuda.PTXAS_RECORDING
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(usage)} kernels")


if __name__ == "__main__":
    main()
