"""The live-loop job: :class:`~pfmseg_engine.live.loop.LiveLoop` (a head retrained on stored slide features while
the user paints; ``iter_run()`` events, ``cancel()``), re-exported so every workflow's job is found in
:mod:`pfmseg_engine.jobs`."""

from __future__ import annotations

from ..live.loop import LiveEvent, LiveLoop, LivePrediction, LiveSettings, LiveStep, LiveStopped, LiveSuggestions

__all__ = ["LiveEvent", "LiveLoop", "LivePrediction", "LiveSettings", "LiveStep", "LiveStopped", "LiveSuggestions"]
