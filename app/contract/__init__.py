"""What the actors and the engine agree on, torch-free: the step contract, sampling parameters and
the served model's face. The actors import only this of the engine; the runners implement it."""
