"""The like-for-like check of chapter 05 (run once on an H200 through the device tool, 2026-11-28):
one training step through autograd for torch.nn.BatchNorm and bnlib.nn.BatchNorm (parameters
requiring gradients, running statistics updated), beside the two steps bench_gpu records
("torch": functional batch_norm + .backward(), no parameter gradients; "bnlib": forward_torch +
backward_torch called directly). CUDA events, a 256 MB write before every timed step, medians
of 20, one input per case. Writes $OUT/fair.json with card, date, versions and kernel design
(gpu_environment(); the design-2 recording was written before this and completed by hand). bench_gpu(modules=True) (run by tools/gpu_check.sh)
makes the same comparison inside the benchmark; that code first ran with design 3 (the module rows of gpu_bench_NVIDIA_H200_design3.json).
This script's own run of 2026-11-28 (design 2) ships as bnlib/data/gpu_fair_NVIDIA_H200_design2.json, which chapters 05
and 09 read. Not run by tools/gpu_check.sh.
"""
import argparse
argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
import torch,numpy as np,sys,json,os
sys.path.insert(0,os.getcwd())
from bnlib import cuda,nn as bnn
cuda.module().compile()
fl=torch.empty(256<<20,dtype=torch.uint8,device="cuda")
e0,e1=torch.cuda.Event(enable_timing=True),torch.cuda.Event(enable_timing=True)
def T(f):
 fl.fill_(1);e0.record();f();e1.record();e1.synchronize();return e0.elapsed_time(e1)
res=[]
for sh,dt,lay in [((256,64,56,56),"float32","NCHW"),((256,64,56,56),"float32","NHWC"),((64,128,28,28),"float32","NCHW"),((64,128,28,28),"bfloat16","NHWC"),((32,32,112,112),"bfloat16","NCHW"),((8192,1024),"float32","NCHW")]:
 fmt=torch.channels_last if lay=="NHWC" else torch.contiguous_format
 x=torch.randn(sh,device="cuda",dtype=getattr(torch,dt)).contiguous(memory_format=fmt).requires_grad_()
 dy=torch.randn_like(x)
 w=torch.rand(sh[1],device="cuda")+.5;b=torch.randn(sh[1],device="cuda")
 nm="BatchNorm1d" if len(sh)==2 else "BatchNorm2d"
 ms=[getattr(torch.nn,nm)(sh[1],device="cuda"),getattr(bnn,nm)(sh[1],device="cuda")]
 def mstep(m):
  x.grad=None;m.zero_grad(set_to_none=True);m(x).backward(dy)
 def tstep():
  x.grad=None;torch.nn.functional.batch_norm(x,None,None,w,b,training=True).backward(dy)
 def bstep():
  _,mu,_,iv=cuda.forward_torch(x.detach(),w,b,1e-5);cuda.backward_torch(dy,x.detach(),mu,iv,w)
 fs={"torch":tstep,"bnlib":bstep,"torch.nn":lambda:mstep(ms[0]),"bnlib.nn":lambda:mstep(ms[1])}
 for f in fs.values():
  for _ in range(3):f()
 t={k:[] for k in fs}
 for r in range(20):
  for k,f in fs.items():t[k].append(T(f))
 m={k:float(np.median(v)) for k,v in t.items()}
 res.append({"shape":list(sh),"dtype":dt,"layout":lay,"step_ms":m})
 print(sh,dt,lay," ".join(f"{k} {v:.3f}" for k,v in m.items()),f"bnlib.nn/torch.nn {m['bnlib.nn']/m['torch.nn']:.2f}",flush=True)
from bnlib import bench
env=dict(bench.gpu_environment(),script="tools/gpu_fair_step.py",repeats=20,statistic="median of 20 timed steps, L2 flushed before each")
json.dump({"environment":env,"results":res},open(os.environ["OUT"]+"/fair.json","w"),indent=1)
