"""A fake Ollama server on a real socket, for the test-suite, the benchmarks and ``make demo``.

It speaks Ollama's native API, the OpenAI-compatible ``/v1`` API and a minimal
``/v1/messages``, loads and evicts "models" under a VRAM budget the way Ollama's
scheduler does, records every request, and can be told to stall, fail, crash or
die mid-stream. See :class:`FakeOllama` (in a thread of this process) and
:class:`FakeOllamaProcess` (in a subprocess), and docs/SIMULATOR.md.
"""

from .process import FakeOllamaProcess
from .server import FakeOllama

__all__ = ["FakeOllama", "FakeOllamaProcess"]
