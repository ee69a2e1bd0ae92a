"""Training the project's own small models (the zoo): data rendering, the four objectives (masked diffusion as
LLaDA, shifted masked diffusion as Dream, block diffusion as SDAR, causal LM), a trainer, and export in each
family's real checkpoint layout. Runs on CPU for smoke tests and on a GPU for the real models."""
