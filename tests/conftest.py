import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LlamaForCausalLM directory (GQA, tied embeddings) with an offline tokenizer + chat template."""
    from llm_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_dir_no_template(tmp_path_factory):
    """The same tiny LLaMA, its tokenizer without a chat template (exercises the fallback prompt format)."""
    from llm_fixtures import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)
