"""The configuration file: TOML → validated pydantic models, model-name rules, aliases.

Every key is optional; an empty file (or none) gives a gateway that starts any Hugging Face
repo id on demand. See docs/configuration.md for the reference.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, InvalidModelName, ModelNotFound

CONFIG_ENV = "AUTOSERVE_CONFIG"
MODAL_MAX_GPUS = 8  # the most GPUs Modal gives one container
MAX_MODEL_NAME = 256

# A Hugging Face repo id: "name" or "owner/name", letters, digits, '.', '_', '-', each part
# starting with a letter or digit (so no leading '-' that could pass for a command-line option).
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")  # a key sent in an HTTP header
# A web origin as browsers send it: scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://([a-z0-9._~-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")

PositiveSeconds = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class GatewaySettings(_Strict):
    """``[gateway]``: behaviour of the gateway itself."""

    hold_seconds: PositiveSeconds = 120.0
    """How long a request for a model that is not healthy is held before a 503."""
    idle_seconds: PositiveSeconds = 900.0
    """A pool with no request for this long scales to zero."""
    allow_unlisted: bool = True
    """Start any Hugging Face repo id (``owner/name``) on demand; false: only models under
    ``[models]``."""
    startup_seconds: PositiveSeconds = 1200.0
    """An engine not healthy this long after launch is stopped and marked failed."""
    failure_cooldown_seconds: Annotated[float, Field(ge=0)] = 5.0
    """A failed model is not started again before this many seconds have passed; doubled by
    each start in a row that fails (up to 5 minutes)."""
    stop_grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    """After SIGTERM an engine has this long to exit before SIGKILL."""
    drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    """On SIGTERM, requests in flight get this long to finish before engines are stopped."""
    max_up_wait_seconds: PositiveSeconds = 120.0
    """Upper bound for the ``wait`` long-poll of ``/up`` (on Modal at most 140)."""
    max_body_bytes: Annotated[int, Field(gt=0)] = 32 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    client_header_seconds: PositiveSeconds = 30.0
    """A client has this long to send a request's headers (408 after), which may be 64 KiB.
    On Modal, Modal's own front takes the requests."""
    client_body_seconds: PositiveSeconds = 60.0
    """A request's body may pause this long between two reads (408 after; nginx's
    ``client_body_timeout``): a client that stalls, or vanishes mid-upload without closing,
    does not hold its connection for good. On Modal, Modal's own front takes the requests."""
    local_gpus: Annotated[int, Field(ge=0)] | None = None
    """GPUs the local backend may hand out; unset: counted with ``nvidia-smi``."""
    max_engines: Annotated[int, Field(ge=1)] | None = None
    """Local engines running or starting at once; when full, an idle one is stopped to make
    room (least recently used first), else the busy one serving longest makes way. Unset: as
    many as GPUs allow; on a host without GPUs, 3 (as Ollama loads at most 3 models on CPU),
    or the number of pinned models if that is more."""
    public_routes: list[Literal["/status", "/metrics", "/v1/models"]] = []
    """Routes answered without a key (``/health`` always is)."""
    cors_origins: list[str] = []
    """Web pages allowed to call the gateway from a browser (CORS): origins like
    ``https://chat.example.com``, or ``*`` for any page. None by default, as in vLLM 0.32."""
    min_containers: Annotated[int, Field(ge=0)] = 0
    """Modal: gateway containers kept warm (0: the gateway, too, scales to zero when idle)."""
    modal_proxy_auth: bool = False
    """Modal: engine URLs answer only requests carrying a workspace proxy token, which the
    gateway reads from ``MODAL_PROXY_KEY`` and ``MODAL_PROXY_SECRET`` in its secret: nobody
    else can start engines or keep them busy (see docs/deploy.md, Security)."""

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        value = [origin.lower() for origin in value]  # as browsers send them
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin like 'https://chat.example.com' or "
                    "'http://localhost:3000' (scheme and host, no path) or '*'"
                )
        return value


class ModelSettings(_Strict):
    """Settings shared by ``[defaults]`` and ``[models."name"]``."""

    gpu: str | int | None = None
    """Modal GPU spec ("H100", "H200:2"); locally only the count matters. 0: no GPU."""
    tensor_parallel_size: Annotated[int, Field(ge=1)] | None = None
    """vLLM's ``--tensor-parallel-size``; also the local GPU count when ``gpu`` is unset."""
    vllm_args: list[str] | None = None
    """Extra arguments for vLLM's server; appended after those of ``[defaults]`` (a
    ``command`` model takes none: its command is the whole command line)."""
    env: dict[str, str] | None = None
    """Extra environment for the engine; merged over that of ``[defaults]``."""
    startup_seconds: PositiveSeconds | None = None
    """Overrides ``[gateway] startup_seconds`` for this model."""
    idle_seconds: PositiveSeconds | None = None
    """Overrides ``[gateway] idle_seconds`` for this model."""
    engine_python: str | None = None
    """Python interpreter that has vLLM installed (local backend)."""
    min_containers: Annotated[int, Field(ge=0)] | None = None
    """Engines kept warm even when idle: on Modal, containers (paid while idle); locally, 1 or
    more starts the engine with the gateway and keeps it until ``/down``."""
    # Modal backend
    max_containers: Annotated[int, Field(ge=1)] | None = None
    """Modal: upper bound of the model's autoscaled pool."""
    max_inputs: Annotated[int, Field(ge=1)] | None = None
    """Concurrent requests one engine container takes (``@modal.concurrent``)."""
    memory_snapshot: bool | None = None
    """Modal: opt in to memory snapshots for faster cold starts (single-GPU models only)."""

    def gpu_count(self) -> int:
        """GPUs one engine needs: ``2`` or ``"H100:2"`` → 2, ``"H100"`` → 1, unset → the
        tensor-parallel size, or 1."""
        if isinstance(self.gpu, int):
            return self.gpu
        if isinstance(self.gpu, str):
            _, _, count = self.gpu.partition(":")
            return int(count) if count else 1
        return self.tensor_parallel_size or 1

    def effective_startup_seconds(self, gateway: GatewaySettings) -> float:
        """This model's start deadline: its own, else the gateway's."""
        return self.startup_seconds or gateway.startup_seconds

    def effective_idle_seconds(self, gateway: GatewaySettings) -> float:
        """How long this model's engine may idle: its own, else the gateway's."""
        return self.idle_seconds or gateway.idle_seconds

    @field_validator("gpu")
    @classmethod
    def _gpu_spec(cls, value: str | int | None) -> str | int | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be a GPU spec like 'H100:2' or a count >= 0")
        # Modal's spec: a type, "!" (exactly this type, never upgraded) or "+" (this type or
        # better), and a count (one digit: at most MODAL_MAX_GPUS per container).
        spec = rf"[A-Za-z0-9_-]+[!+]?(:[1-{MODAL_MAX_GPUS}])?"
        if isinstance(value, str) and not re.fullmatch(spec, value):
            raise ValueError(
                f"{value!r} is not a GPU spec like 'H100', 'H100!' or 'H200:2' "
                f"(at most {MODAL_MAX_GPUS})"
            )
        return value


class ModelConfig(ModelSettings):
    """``[models."name"]``: one model; unset keys come from ``[defaults]``."""

    aliases: list[str] = []
    """Other names clients may use for this model."""
    lora_modules: dict[str, str] = {}
    """LoRA adapters the engine serves, ``{name = "repo id or path"}``: vLLM gets
    ``--enable-lora --lora-modules``, and requests naming an adapter go to this model's
    engine with the adapter's name (a ``command`` or ``url`` upstream must know it)."""
    command: list[str] | None = None
    """Launch this instead of vLLM; ``{port}``, ``{model}`` and ``{host}`` are filled in."""
    url: str | None = None
    """An upstream that is already running: routed to, never started or stopped."""
    api_key: str | None = None
    """Key the static upstream (``url``) expects, if any."""
    api_key_env: str | None = None
    """Instead of ``api_key``: the environment variable that holds it, read when the
    upstream is first checked (keeps the key out of the file)."""

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_SAFE.fullmatch(value):
            raise ValueError("'api_key' must be printable ASCII without spaces")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"'api_key_env' must name an environment variable, not {value!r}")
        return value

    def upstream_api_key(self) -> str | None:
        """``api_key``, or the value of ``api_key_env`` (ValueError if unset or unusable)."""
        if self.api_key_env is None:
            return self.api_key
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set")
        if not _HEADER_SAFE.fullmatch(value):
            raise ValueError(f"{self.api_key_env} must be printable ASCII without spaces")
        return value

    @field_validator("lora_modules")
    @classmethod
    def _adapter_paths(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not path.strip() or _CONTROL.search(path):
                raise ValueError(f"adapter {name!r}: {path!r} is not a repo id or path")
        return value

    @model_validator(mode="after")
    def _command_or_url(self) -> ModelConfig:
        if self.command is not None and self.url is not None:
            raise ValueError("'command' and 'url' exclude each other")
        if self.command is not None and not self.command:
            raise ValueError("'command' must not be empty")
        # Other braces are the command's own business (``${HF_HOME}``, JSON, f-strings).
        if self.command is not None and not any("{port}" in arg for arg in self.command):
            raise ValueError(
                "'command' must contain {port}: the engine must listen on the port the "
                "gateway picks for it"
            )
        if self.url is not None and not re.match(r"^https?://[^\s/]+", self.url):
            raise ValueError(f"'url' must be an http(s) URL, got {self.url!r}")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("'api_key' and 'api_key_env' exclude each other")
        return self


class Config(_Strict):
    """The whole file."""

    gateway: GatewaySettings = GatewaySettings()
    defaults: ModelSettings = ModelSettings()
    models: dict[str, ModelConfig] = {}

    @model_validator(mode="after")
    def _names_unique(self) -> Config:
        seen = {name: f'models."{name}"' for name in self.models}
        for name, model in self.models.items():
            _check_configured_name(name, "models")
            if model.command is not None and model.vllm_args is not None:
                raise ValueError(
                    f"models.\"{name}\": 'vllm_args' do not apply to a 'command': put them in it"
                )
            where = f'models."{name}".aliases'
            for alias in model.aliases:
                _check_configured_name(alias, where)
                if alias == name:
                    raise ValueError(f"{where}: {alias!r} is the model's own name")
                if alias in seen:
                    raise ValueError(f"{where}: {alias!r} is already used by {seen[alias]}")
                seen[alias] = where
            where = f'models."{name}".lora_modules'
            for adapter in model.lora_modules:
                _check_configured_name(adapter, where)
                if adapter in seen:
                    raise ValueError(f"{where}: {adapter!r} is already used by {seen[adapter]}")
                seen[adapter] = where
        return self

    @model_validator(mode="after")
    def _pins_fit_max_engines(self) -> Config:
        # A pinned engine is never stopped for another: one pin past the limit would wait
        # for a slot for good, and every unpinned model with it.
        limit = self.gateway.max_engines
        pinned = self.pinned_engines()
        if limit is not None and len(pinned) > limit:
            raise ValueError(
                f"gateway.max_engines = {limit}, but {len(pinned)} models are pinned with "
                f"min_containers ({', '.join(pinned)}): pinned engines are never stopped to "
                "make room, so raise max_engines or pin fewer"
            )
        return self

    @model_validator(mode="after")
    def _gpus_fit_tensor_parallel(self) -> Config:
        # vLLM refuses a tensor-parallel size larger than the GPUs it sees: on Modal each such
        # start would pay for a GPU container and fail.
        for name in ["", *self.models]:
            settings = self.model(name)
            if settings.command is not None or settings.url is not None:
                continue
            tensor_parallel, gpu = settings.tensor_parallel_size, settings.gpu
            if tensor_parallel is None or gpu is None or gpu == 0:
                continue
            if tensor_parallel > settings.gpu_count():
                where = f'models."{name}"' if name else "defaults"
                inherited = " (from [defaults])" if name and self.models[name].gpu is None else ""
                if isinstance(gpu, int):
                    fix = f"set gpu = {tensor_parallel}"
                elif tensor_parallel <= MODAL_MAX_GPUS:
                    fix = f'set gpu = "{gpu.partition(":")[0]}:{tensor_parallel}"'
                else:
                    fix = (
                        f"a Modal GPU spec names at most {MODAL_MAX_GPUS} "
                        f"(on a local host: gpu = {tensor_parallel})"
                    )
                raise ValueError(
                    f"{where}: tensor_parallel_size = {tensor_parallel} needs "
                    f"{tensor_parallel} GPUs, but gpu = {gpu!r}{inherited} gives "
                    f"{settings.gpu_count()}; {fix}"
                )
        return self

    # -- lookups -----------------------------------------------------------------------

    def resolve(self, requested: str) -> str:
        """The canonical model name for a requested name or alias.

        Raises ``InvalidModelName`` (400) for names that are neither configured nor a
        Hugging Face repo id, and ``ModelNotFound`` (404) for unlisted ones when
        ``allow_unlisted`` is false.
        """
        if not isinstance(requested, str) or not requested:
            raise InvalidModelName("'model' must be a non-empty string", param="model")
        if requested in self.models:
            return requested
        for name, model in self.models.items():
            if requested in model.aliases or requested in model.lora_modules:
                return name
        check_model_name(requested)
        if not self.gateway.allow_unlisted:
            raise ModelNotFound(
                f"[{requested}] is not a configured model; "
                "this gateway serves only the models listed in its configuration"
                + self._configured_list(),
                param="model",
            )
        if "/" not in requested:
            # A client's default ("gpt-4o-mini") or a typo, not a model to start: every model
            # on the Hub has an owner ("gpt2" is "openai-community/gpt2").
            raise ModelNotFound(
                f"[{requested}] is not a configured model; a model that is not configured "
                "is started by its full Hugging Face repo id ('owner/name')"
                + self._configured_list(),
                param="model",
            )
        return requested

    def _configured_list(self, most: int = 10) -> str:
        """The configured models by the names clients know them by, for a mistyped name (as
        vLLM lists its served names)."""
        names = [self.shown_name(name) for name in self.models]
        if not names:
            return ""
        more = f" and {len(names) - most} more: see GET /v1/models" if len(names) > most else ""
        return f" (configured: {', '.join(names[:most])}{more})"

    def pinned_engines(self) -> list[str]:
        """The models whose engines start with the gateway and stay until ``/down``
        (``min_containers``; a ``url`` upstream has no engine of ours)."""
        return [
            name
            for name in self.models
            if self.model(name).min_containers and self.model(name).url is None
        ]

    def model(self, name: str) -> ModelConfig:
        """Effective settings of a canonical name: the model's own over ``[defaults]``.

        ``env`` is merged (the model's keys win) and ``vllm_args`` are appended after the
        defaults' (vLLM takes the last occurrence of a flag).
        """
        own = self.models.get(name, ModelConfig())
        merged: dict[str, Any] = self.defaults.model_dump()
        for key, value in own.model_dump(exclude_unset=True).items():
            merged[key] = value
        merged["env"] = {**(self.defaults.env or {}), **(own.env or {})}
        merged["vllm_args"] = [*(self.defaults.vllm_args or []), *(own.vllm_args or [])]
        return ModelConfig.model_validate(merged)

    def names_sent_as_is(self) -> frozenset[str]:
        """Names other than a model's own that go upstream unchanged (the body as it was
        sent, not decoded and encoded again): LoRA adapters, and aliases of models whose vLLM
        the gateway starts with the aliases as served names. A ``command`` or ``url``
        upstream knows only the model's own name."""
        names: set[str] = set()
        for model in self.models.values():
            names.update(model.lora_modules)
            if model.command is None and model.url is None:
                names.update(model.aliases)
        return frozenset(names)

    def served_names(self, name: str) -> list[str]:
        """``--served-model-name`` for a vLLM the gateway starts. vLLM's answers carry the
        first: the model's own name, or its first alias when the model is a local folder,
        whose path is no business of clients."""
        aliases = self.aliases_of(name)
        if aliases and name.startswith(("/", "~", ".")):
            return [*aliases, name]
        return [name, *aliases]

    def shown_name(self, name: str) -> str:
        """The name clients know a model by: its own, or a local folder's first alias (the
        first served name)."""
        return self.served_names(name)[0]

    def aliases_of(self, name: str) -> list[str]:
        model = self.models.get(name)
        return list(model.aliases) if model else []


def check_model_name(name: str) -> None:
    """Accept a Hugging Face repo id; refuse anything that could escape a path or an argv."""
    shown = name if len(name) <= 80 and not _CONTROL.search(name) else repr(name[:80]) + "..."
    if len(name) > MAX_MODEL_NAME:
        raise InvalidModelName(
            f"model name is {len(name)} characters long; at most {MAX_MODEL_NAME} are allowed",
            param="model",
        )
    if not _HF_REPO_ID.fullmatch(name) or ".." in name or "--" in name or name.endswith(".git"):
        raise InvalidModelName(
            f"[{shown}] is not a configured model nor a valid Hugging Face repo id "
            "('owner/name' of letters, digits, '.', '_' and '-')",
            param="model",
        )


def _check_configured_name(name: str, where: str) -> None:
    # Configured names may be local paths or free-form labels, but nothing that could be
    # taken for an option or break a log line.
    if not name or len(name) > MAX_MODEL_NAME or _CONTROL.search(name) or name.startswith("-"):
        raise ValueError(f"{where}: {name!r} is not a usable model name")
    if name != name.strip():
        raise ValueError(f"{where}: {name!r} has leading or trailing whitespace")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the file at ``path`` (or ``$AUTOSERVE_CONFIG``; none: defaults)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None:
        return Config()
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(file))


def _did_you_mean(location: tuple[int | str, ...]) -> str:
    """A close known key for a mistyped one (``[model."x"]``, ``hold_secs``), if any."""
    tables: dict[tuple[str, ...], type[BaseModel]] = {
        (): Config,
        ("gateway",): GatewaySettings,
        ("defaults",): ModelSettings,
    }
    parent = tuple(str(part) for part in location[:-1])
    model = tables.get(parent) or (ModelConfig if parent[:1] == ("models",) else None)
    if model is None:
        return ""
    key = str(location[-1])
    if model is not GatewaySettings and key in GatewaySettings.model_fields:
        return f"; {key!r} is a [gateway] key"
    if model in (Config, GatewaySettings) and key in ModelSettings.model_fields:
        return f'; {key!r} is a key of [defaults] or [models."NAME"]'
    if model is not ModelConfig and key in ModelConfig.model_fields:
        return f'; {key!r} is a key of [models."NAME"]'
    close = difflib.get_close_matches(key, model.model_fields, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(_quote_key(part) for part in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key" + _did_you_mean(err["loc"])
            # Checks across models name their key in the message.
            problems.append(f"  {key}: {message}" if key else f"  {message}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None


def _quote_key(part: int | str) -> str:
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else f'"{text}"'
