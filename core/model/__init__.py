"""DiffusionCom model parts: the diffusion math and the conditional denoiser network."""
