"""Judge back ends: something that answers a list of chat messages with text.

- `OpenAIBackend`: any OpenAI-compatible chat-completions server (OpenAI, a vLLM or llama.cpp
  server), temperature 0. Timeouts, connection errors, 429 and 5xx are retried with exponential
  backoff; a final failure raises `JudgeError` (the comparison is recorded as an error). The API
  key is read from the environment variable the config names and is never written anywhere.
- `HFBackend`: a local Hugging Face chat model, greedy, offline.
"""

from __future__ import annotations

import os
import time

import torch

from eval.judges import JudgeError
from preference_datasets import Messages
from utils import ConfigError


def missing_api_key(variable: str) -> str | None:
    """What is wrong when the environment variable that should hold the judge's API key is empty."""
    if os.environ.get(variable):
        return None
    return f"the environment variable {variable} is not set (it holds the judge's API key)"


class OpenAIBackend:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key_env: str, timeout: float = 60.0, max_retries: int = 5,
                 backoff: float = 1.0, concurrency: int = 4):
        import openai

        problem = missing_api_key(api_key_env)
        if problem:
            raise ConfigError(f"openai.api_key_env={api_key_env}: {problem}")
        self.openai, self.model_name, self.max_retries, self.backoff = openai, model, max_retries, backoff
        self.concurrency = concurrency
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ[api_key_env],
                                     timeout=timeout, max_retries=0)  # retries are ours: counted, backed off

    def complete(self, messages: Messages, max_tokens: int) -> str:
        openai = self.openai
        retried = (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.chat.completions.create(model=self.model_name, messages=messages, temperature=0,
                                                               max_tokens=max_tokens)
                return response.choices[0].message.content or ""
            except retried as error:
                last = error
                if attempt < self.max_retries:
                    time.sleep(self.backoff * 2**attempt)
            except openai.APIStatusError as error:  # 400, 401, 404...: asking again cannot help
                raise JudgeError(f"{self.model_name}: HTTP {error.status_code}: {error.message}") from None
        raise JudgeError(f"{self.model_name}: no answer after {self.max_retries + 1} attempts ({type(last).__name__}: {last})")


class HFBackend:
    """A local chat model as the judge: its greedy answer to the protocol's messages."""

    name = "hf"

    def __init__(self, model: str, cache_dir: str | None = None):
        from eval.sampling import load_chat_model
        from utils import resolve_model_path

        self.model_name = model
        source = model if os.path.isdir(model) else resolve_model_path(model, cache_dir)
        self.model, self.tokenizer = load_chat_model(source, dtype="auto")  # the judge's own dtype

    def complete(self, messages: Messages, max_tokens: int) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            output = self.model.generate(**batch, do_sample=False, temperature=None, top_p=None, top_k=None,
                                         max_new_tokens=max_tokens, pad_token_id=pad_id)
        return self.tokenizer.decode(output[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
