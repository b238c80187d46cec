"""The engine-backed model: linears on the engine, fusion and folded prologues, int8 embeddings, memory, the
conversion from a fake-quant model (convert.py, on top), and the simulation of the folded prologues."""
