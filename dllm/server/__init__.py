"""The OpenAI-compatible HTTP server (`dllm serve`), in vLLM's three layers:

    protocol.py           pydantic request/response models with OpenAI's field names (dLLM extras marked)
    serving_chat.py       /v1/chat/completions  } turn a request into an error, a response or an SSE stream;
    serving_completions.py /v1/completions      } shared steps live in serving_common.py and choice.py
    app.py                thin FastAPI routes, auth, error handlers

driving one `LLM` through `engine_client.py` (a batching queue in front of one worker thread that owns the
engine). It has no decoding logic of its own. Importing `dllm.server.cli` does not import FastAPI; the other
modules need the `server` extra (`pip install 'dllm[server]'`).
"""
