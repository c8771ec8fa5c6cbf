"""The batching engine: one thread owns the model; every active generation is a row.

Each tick the engine thread (loop.py)
1. admits waiting requests as rows, up to ``max_streams`` (scheduler.py),
2. feeds one chunk of one long prompt with ``forward``, round-robin over the rows still reading a
   long prompt, so a long prompt never stalls the others for more than one chunk (scheduler.py),
3. builds one batch of every row that needs a character, up to ``max_batch`` (batch.py), and runs
   ONE scripted call over it (step.py): decoding rows feed their last character and sample the
   next one, each with its own parameters and PRNG; rows with a short prompt left feed their
   next prompt character in the same step; a small batch takes several characters per tick
   while nobody waits,
4. walks what each row produced: snapshots of its state (snapshots.py), stop strings
   (stops.py), text for its client, its result (outputs.py), and
5. hands the new text to the event loop in one thread-safe call, at most every
   ``flush_interval_s`` while it keeps working (handover.py).

State. A row's state is (h, c) after all of its text but the last character, plus that last
character, "pending", not yet fed: exactly what a session stores, so the state "after the text
returned so far" is available after every tick with no extra model step, and a stop string or a
client disconnect rewinds to the right snapshot (snapshots.py). A row's progress is one count of
characters sampled (row.py).

Batch invariance. Steps that carry a seeded or greedy row are padded to the batch size from which
the model's steps agree bit for bit, measured at start-up (calibration.py), so such a row's text
never depends on which other streams share its batches.

No eager torch op runs on the engine's thread: each gives up the GIL and, behind a busy event
loop, waits up to a switch interval to take it back (see `StepSampler` in service/sampling.py).
"""

from service.engine.config import EngineConfig
from service.engine.core import Engine
from service.engine.requests import EngineFull, EngineStopped, Finished, GenerationRequest, StreamHandle

__all__ = ["Engine", "EngineConfig", "EngineFull", "EngineStopped", "Finished", "GenerationRequest", "StreamHandle"]
