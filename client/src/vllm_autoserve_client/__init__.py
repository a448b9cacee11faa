"""Drop-in OpenAI clients for a vLLM Autoserve gateway that wait out cold starts.

>>> from vllm_autoserve_client import AutoserveClient
>>> client = AutoserveClient(model="Qwen/Qwen3-0.6B")  # doctest: +SKIP
>>> client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from ._client import AsyncAutoserveClient, AutoserveClient
from ._errors import AutoserveError, ModelFailedError, ModelFailedResponse, ModelStartTimeout
from ._settings import DEFAULT_UP_TIMEOUT
from ._up import WaitCallback

__all__ = [
    "DEFAULT_UP_TIMEOUT",
    "AsyncAutoserveClient",
    "AutoserveClient",
    "AutoserveError",
    "ModelFailedError",
    "ModelFailedResponse",
    "ModelStartTimeout",
    "WaitCallback",
]
