"""The names the commands offer (choices, defaults, an environment variable), in a module that imports nothing
heavy: the command-line parser is built from it alone, so `align-diffusion --help` and a bad flag answer at once
rather than after torch and diffusers load. The modules that use these names import them from here."""

# torch's CPU generator reads a seed's low 32 bits: seeds s and s + 2**32 draw the same noise.
SEED_LIMIT = 2**32

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtypes, by their names in torch

# Flow-GRPO's a = 0.7, DanceGRPO's η = 0.3, Flow-CPS's 0.8, and DDPM-like DDIM (η = 1).
DEFAULT_NOISE_LEVEL = {"ode": 0.0, "flow-sde": 0.7, "dance-sde": 0.3, "cps": 0.8, "ddim": 1.0}

STEERING_METHODS = ("best-of-n", "fk", "reno", "ttsnap")
FK_POTENTIALS = ("max", "sum", "difference")
FK_RESAMPLING = ("multinomial", "systematic")

WORLD_ASSETS = ("clip", "dino", "vae", "sd3", "sd")  # the shapes world's models, built in this order

REWARD_TOKEN_ENV = "ALIGN_DIFFUSION_REWARD_TOKEN"  # the bearer token of a remote reward, kept out of `ps`
