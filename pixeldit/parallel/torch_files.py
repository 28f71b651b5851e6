"""torch.save and DCP to a local folder or an fsspec URL, with the options registered for its root."""

from __future__ import annotations

import io
import os

import torch

from .. import storage
from .torch_internals import fsspec_dcp_reader, fsspec_dcp_writer


def save_torch(obj, url: str):
    if not storage.is_remote(url):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        torch.save(obj, url)
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.write_whole(url, buffer.getvalue())


def load_torch(url: str, **kwargs):
    if not storage.is_remote(url):
        return torch.load(url, **kwargs)
    return torch.load(io.BytesIO(storage.read_bytes(url, storage.options_for(url))), **kwargs)


def dcp_save(state: dict, url: str):
    import torch.distributed.checkpoint as dcp
    if storage.is_remote(url):
        dcp.save(state, storage_writer=fsspec_dcp_writer(url, storage.options_for(url)))
    else:
        dcp.save(state, checkpoint_id=url)


def dcp_load(state: dict, url: str):
    import torch.distributed.checkpoint as dcp
    if storage.is_remote(url):
        dcp.load(state, storage_reader=fsspec_dcp_reader(url, storage.options_for(url)))
    else:
        dcp.load(state, checkpoint_id=url)
