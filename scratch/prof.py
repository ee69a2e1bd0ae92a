import cProfile, pstats, sys, time, torch
from dllm import LLM, SamplingParams
model, cache, strat = sys.argv[1], sys.argv[2], sys.argv[3]
block = int(sys.argv[4])
torch.set_num_threads(1)
llm = LLM(model, cache=cache, strategy=strat, device="cpu", dtype="float32")
sp = SamplingParams(max_tokens=128, block_length=block, ignore_eos=True, temperature=0)
p = ["What is 12 times 7?"]
llm.generate(p, sp)
t = time.perf_counter(); out = llm.generate(p, sp); dt = time.perf_counter() - t
nfe = out[0].metrics.nfe
print(f"{model} {cache} {strat}: {dt*1000:.1f} ms, nfe {nfe}, {dt/nfe*1000:.2f} ms/step")
pr = cProfile.Profile(); pr.enable(); llm.generate(p, sp); pr.disable()
st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(25)
