"""Resources whose methods let ``model`` be left out when the client has a default model.

The SDK refuses a call without ``model`` before any hook runs (``required_args``, or a
keyword-only parameter without a default). These subclasses pass ``model=omit`` instead, so
the body goes out without one and the client's ``_prepare_options`` fills in the default --
the one place where that happens, for every way of calling (raw and streaming responses too).
Static type checkers still see the SDK's signatures, which require ``model``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from openai import omit
from openai._compat import cached_property
from openai.resources import AsyncCompletions as AsyncTextCompletions
from openai.resources import AsyncEmbeddings, Embeddings
from openai.resources import Completions as TextCompletions
from openai.resources.chat import AsyncChat, Chat
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.responses import AsyncResponses, Responses

_F = TypeVar("_F", bound=Callable[..., Any])


def _model_optional(method: _F) -> _F:
    """Wrap a resource method so that a default model can stand in for ``model``."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "model" not in kwargs and getattr(self._client, "model", None) is not None:
            kwargs["model"] = omit
        return method(self, *args, **kwargs)

    return cast(_F, call)


def _model_filled_in(method: _F) -> _F:
    """Wrap a method that checks ``model`` itself (``responses.stream``): it gets the
    client's default model by name, unless it resumes a response by its id."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        default = getattr(self._client, "model", None)
        if "model" not in kwargs and "response_id" not in kwargs and default is not None:
            kwargs["model"] = default
        return method(self, *args, **kwargs)

    return cast(_F, call)


class ChatCompletions(Completions):
    create = _model_optional(Completions.create)
    parse = _model_optional(Completions.parse)
    stream = _model_optional(Completions.stream)


class AsyncChatCompletions(AsyncCompletions):
    create = _model_optional(AsyncCompletions.create)
    parse = _model_optional(AsyncCompletions.parse)
    stream = _model_optional(AsyncCompletions.stream)


class DefaultModelChat(Chat):
    @cached_property
    def completions(self) -> Completions:
        return ChatCompletions(self._client)


class AsyncDefaultModelChat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return AsyncChatCompletions(self._client)


class DefaultModelCompletions(TextCompletions):
    create = _model_optional(TextCompletions.create)


class AsyncDefaultModelCompletions(AsyncTextCompletions):
    create = _model_optional(AsyncTextCompletions.create)


class DefaultModelEmbeddings(Embeddings):
    create = _model_optional(Embeddings.create)


class AsyncDefaultModelEmbeddings(AsyncEmbeddings):
    create = _model_optional(AsyncEmbeddings.create)


class DefaultModelResponses(Responses):
    stream = _model_filled_in(Responses.stream)


class AsyncDefaultModelResponses(AsyncResponses):
    stream = _model_filled_in(AsyncResponses.stream)
