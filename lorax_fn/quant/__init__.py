"""Quantised base weights (QLoRA): codecs first; the ``QuantizedArray`` node and the
``lorafy``/``lora`` integration follow (see the QLoRA issue)."""
