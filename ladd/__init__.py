"""ladd: Latent Adversarial Diffusion Distillation of Z-Image."""

__version__ = "0.1.0"
