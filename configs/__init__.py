"""The shipped experiment configs (installed with attnlab): ``--config NAME`` loads ``configs/NAME.py``.

Each module's ``get_config(arg)`` returns an ml_collections ``ConfigDict`` with the
sections the trainer reads; ``arg`` is the text after ``:`` (``mqar:attn=gqa,steps=200``).
``common.py`` builds the sections they share. ``train.config_args.shipped_configs()``
lists them; a file of one's own is given by path (``--config my_config.py``).
"""
