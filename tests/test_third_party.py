"""Real third-party peers: Janus's EchoTest as a target, coturn as a relay."""

from __future__ import annotations

from pathlib import Path

from conftest import Reflector, call
from targets import coturn, janus_in_namespace, log_tail

from callmon.callresult import Signaling, Status
from probes.ice import IceOptions, IceServer


async def test_a_call_to_janus_echotest_has_plausible_numbers(tmp_path: Path) -> None:
    async with janus_in_namespace(tmp_path) as janus:
        # Janus offers no loopback candidate: the probe talks to it over the veth pair.
        ice = IceOptions(hosts=(janus.host_address,))
        result = await call(janus.url, 6, signaling=Signaling.JANUS, ice=ice)
        logs = log_tail(janus.log_path)
    s, p = result.summary, result.phases
    assert result.status is Status.OK, (result.failure, result.degradations, logs)
    assert result.target.session is not None
    assert "/" in result.target.session
    assert result.route is not None
    assert result.route.remote_address.startswith(janus.url.split("//")[1].split(":")[0])
    assert p.connect_s is not None
    assert p.connect_s < 0.6
    assert s.audio.loss == 0
    assert s.video.loss == 0
    assert s.video.freezes == 0
    assert s.audio.gaps == 0
    assert s.video.fps is not None
    assert s.video.fps > 13
    assert s.av_offset_s is not None
    assert abs(s.av_offset_s) < 0.02
    for media in (s.audio, s.video):
        assert media.jitter_s is not None
        assert media.jitter_s < 0.01
        assert media.delay_s is not None
        assert media.delay_s < 0.05
    assert s.rtt_s is not None
    assert s.rtt_s < 0.05


async def test_a_relay_only_call_goes_through_coturn(tmp_path: Path, reflector: Reflector) -> None:
    async with coturn(tmp_path) as turn:
        ice = IceOptions(
            servers=(IceServer(url=turn.url, username=turn.username, credential=turn.password),),
            relay_only=True,
        )
        result = await call(reflector.url, 4, ice=ice)
        logs = log_tail(turn.log_path, 200)
    assert result.status is Status.OK, (result.failure, logs)
    assert result.route is not None
    assert result.route.local_candidate == "relay"
    assert "ALLOCATE" in logs
    assert "success" in logs
    assert result.summary.video.frames > 40
