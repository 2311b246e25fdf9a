"""mlxfam: every Llama-like LLM family on MLX, from its original checkpoint.

model, tokenizer = mlxfam.load("smollm2-135m")
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
print(mlxfam.generate(model, tokenizer, ids, max_tokens=64))
"""

from .cache import CacheOptions
from .convert import convert
from .errors import MlxfamError
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .loader import load, load_tokenizer
from .perplexity import perplexity
from .prompt_cache import load_prompt_cache, save_prompt_cache
from .tokenizer import Tokenizer

__all__ = [
    "CacheOptions",
    "GenerationResponse",
    "MlxfamError",
    "Tokenizer",
    "convert",
    "generate",
    "generate_step",
    "load",
    "load_tokenizer",
    "load_prompt_cache",
    "perplexity",
    "save_prompt_cache",
    "stream_generate",
]
