"""What the sweeps of tools/gpu_check.sh share (tools/gpu_grid_sweep.py, tools/gpu_l2_chunks.py): run
bnlib.bench.bench_gpu and record its rows with the card, date and versions, rewriting the JSON after
every case (a run cut short keeps the cases it finished, marked partial)."""
import sys


def recorded_bench_gpu(path, **bench_kwargs):
    """bench_gpu(**bench_kwargs, on_rows=...) with its rows written to `path` as they come and at the end.
    Returns the rows, or None (with a message on stderr) when CuPy sees no CUDA device."""
    from bnlib import bench, cuda
    if not cuda.available():
        print("no CUDA device visible to CuPy", file=sys.stderr)
        return None
    env = bench.gpu_environment()
    rows = bench.bench_gpu(**bench_kwargs, on_rows=lambda rows: bench.write_recording(path, env, rows, partial=True))
    bench.write_recording(path, env, rows)
    return rows
