"""The live daemon: watch a folder, stack each complete frame as it lands, checkpoint, serve the web page.

    watch.py    watchdog -> queue of complete files, in capture order
    service.py  queue -> Engine.process -> frames.jsonl; outputs, checkpoint, published snapshot; SIGTERM
    config.py   the [watch], [daemon] and [web] sections of livestack.toml
"""
