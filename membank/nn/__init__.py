"""membank.nn: everything in membank that needs torch, behind one line.

    model.py     the anchor decoder (KV cache) whose layers take fetched memory
    memory.py    FFN / LoRA / KV memories and the trainable MemoryBank
    posthoc.py   FFN memories hooked onto a frozen Hugging Face Llama-family model
    decode.py    batched greedy decoding with a KV cache
    embed.py     the MiniLM text embedder (sentence-transformers, hence torch)
    static_embed.py  a static embedder distilled from MiniLM (a table and a tokenizer; its
                 runtime is torch-free), and which embedder a run or a router uses
    tensors.py   blocks and export files as tensors: buffer <-> tensor, int8 decoded into a
                 tensor, the export's safetensors writers

Training and the device import it (the `device` / `train` extras install torch); the bank
server never does, and the rest of `membank` never imports from here, so a server installed
without torch stands (tests/unit/test_torch_free.py).
"""
