// airlock viewer (/session/:id?token=...): shows a login session's state
// and steps (Server-Sent Events), its browser's screen over WebRTC (JPEG
// frames over the WebSocket when WebRTC cannot connect), and sends the
// person's mouse, wheel, touch, keys and pastes to that browser.
// Signalling runs over /api/webrtc/session/:id/ws: this page always
// offers, the streamer answers; an ICE restart is a new offer. Tests read window.airlockViewer.
// Query parameters besides the token: fallbackAfterMs (when to fall back
// to JPEG frames) and iceTransportPolicy=relay (TURN only).
'use strict';

(function () {
  const params = new URLSearchParams(location.search);
  const sessionId = decodeURIComponent(location.pathname.replace(/\/+$/, '').split('/').pop());
  let token = params.get('token') || '';
  const FINAL = ['completed', 'failed', 'cancelled', 'expired'];
  const BUTTONS = { 0: 1, 1: 2, 2: 3 };
  const RESTART_GRACE_MS = 4000;

  const el = (id) => document.getElementById(id);
  const ui = {
    provider: el('provider'), state: el('state'), steps: el('steps'), banner: el('banner'),
    usercode: el('usercode'), usercodeValue: el('usercode-value'),
    video: el('screen'), img: el('fallback'), stage: el('stage'), keys: el('keys'),
    connection: el('connection'), rtt: el('rtt'), control: el('control'),
  };

  // The hook tests read; the page's own state lives here too.
  const hook = window.airlockViewer = {
    state: 'starting', framesRendered: 0, jpegFrames: 0, session: null, viewerId: null,
    controlling: false, streamer: null, connection: 'new', fallback: false, rttMs: null,
    peers: 0, iceRestarts: 0, socketOpens: 0, errors: [], pc: null, viewport: null,
    remoteEditable: false, copies: 0,
  };

  let ended = false;
  let iceServers = [];
  let jpegFps = 5;
  let connectTimeoutMs = 5000;
  let events = null;
  let ws = null;
  let wsBackoff = 500;
  let welcomed = false;
  let pc = null;
  let dc = null;
  let pending = [];
  let restarting = false;
  const timers = { restart: 0, fallback: 0, ping: 0, socket: 0, retry: 0 };
  // A refused offer (the streamer busy or slow) is tried again, backing off.
  let offerBackoff = 2000;

  // ------------------------------------------------------------ messages

  let bannerKind = '';
  function banner(text, kind) {
    if (bannerKind === 'fatal' && kind !== 'fatal') return;
    bannerKind = kind;
    ui.banner.textContent = text;
    ui.banner.className = kind === 'fatal' ? 'fatal' : '';
    ui.banner.hidden = false;
  }
  function clearBanner(kind) {
    if (bannerKind !== kind) return;
    bannerKind = '';
    ui.banner.hidden = true;
  }
  function setState(s) {
    hook.state = s;
  }

  function end(text, state) {
    if (ended) return;
    ended = true;
    setState(state || 'ended');
    banner(text, 'fatal');
    closePeer();
    for (const t of Object.values(timers)) clearTimeout(t);
    if (ws) ws.close(1000, 'done');
    ws = null;
    if (events && (state === 'refused')) events.close();
  }

  // ------------------------------------------------------------ session

  function openEvents() {
    if (events) events.close();
    const url = '/api/auth/session/' + encodeURIComponent(sessionId) + '/events?token=' + encodeURIComponent(token);
    events = new EventSource(url);
    events.addEventListener('session', (e) => showSession(JSON.parse(e.data)));
  }

  function showSession(v) {
    hook.session = v;
    ui.provider.textContent = v.provider;
    ui.state.textContent = v.state.replace(/_/g, ' ');
    const items = v.steps.map(stepItem);
    if (v.stepsOmitted) {
      // The history keeps its first steps and its latest.
      const gap = document.createElement('li');
      gap.className = 'detail';
      gap.textContent = '… ' + v.stepsOmitted + ' more steps …';
      items.splice(Math.min(16, items.length), 0, gap);
    }
    ui.steps.replaceChildren(...items);
    // A device-code login: the vendor's page asks for the code the CLI printed.
    ui.usercodeValue.textContent = v.userCode || '';
    ui.usercode.hidden = !v.userCode || FINAL.includes(v.state);
    if (FINAL.includes(v.state)) {
      events.close();
      end('The session ' + v.state + (v.error ? ': ' + v.error : '.'), 'ended');
    }
  }

  function stepItem(s) {
    const li = document.createElement('li');
    const time = new Date(s.at).toLocaleTimeString();
    li.textContent = time + ' ' + s.event + (s.event === 'state' ? ': ' + s.state.replace(/_/g, ' ') : '')
      + (s.repeated ? ' (' + (s.repeated + 1) + ' times)' : '');
    if (s.detail) {
      const d = document.createElement('div');
      d.className = 'detail';
      d.textContent = s.detail;
      li.appendChild(d);
    }
    return li;
  }

  // ------------------------------------------------------------ socket

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
  }

  function openSocket() {
    if (ended) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = proto + '//' + location.host + '/api/webrtc/session/' + encodeURIComponent(sessionId) +
      '/ws?token=' + encodeURIComponent(token);
    const sock = new WebSocket(url);
    sock.binaryType = 'blob';
    welcomed = false;
    ws = sock;
    sock.onmessage = (e) => {
      if (sock !== ws) return;
      if (typeof e.data === 'string') onMessage(JSON.parse(e.data));
      else showJpeg(e.data);
    };
    sock.onclose = (e) => {
      if (sock === ws) onSocketClosed(e);
    };
  }

  async function onSocketClosed(e) {
    ws = null;
    closePeer();
    hook.viewerId = null;
    if (ended) return;
    if (e.code === 4000) return end(e.reason || 'The session has ended.', 'ended');
    if (!welcomed && !(await checkAccess())) return;
    setState('reconnecting');
    banner('Signalling connection lost' + (e.reason ? ' (' + e.reason + ')' : '') + '; reconnecting…', 'socket');
    timers.socket = setTimeout(openSocket, wsBackoff);
    wsBackoff = Math.min(wsBackoff * 2, 10000);
  }

  // Asks for the ICE servers: it also says whether the token still works.
  async function checkAccess() {
    try {
      const r = await fetch('/api/webrtc/ice-servers?session=' + encodeURIComponent(sessionId) +
        '&token=' + encodeURIComponent(token), { cache: 'no-store' });
      const body = await r.json().catch(() => ({}));
      if (r.ok) {
        iceServers = body.iceServers || [];
        return true;
      }
      if (r.status >= 500) return true;
      end(body.error || 'This link does not open the session (' + r.status + ').', 'refused');
      return false;
    } catch (err) {
      return true;
    }
  }

  function onMessage(m) {
    switch (m.type) {
      case 'welcome': return onWelcome(m);
      case 'control': return setControl(m.controlling);
      case 'streamer': return onStreamer(m.state, m.detail, false);
      case 'answer': return onAnswer(m.sdp);
      case 'candidate': return onRemoteCandidate({ candidate: m.candidate, sdpMLineIndex: m.sdpMLineIndex });
      case 'endOfCandidates': return onRemoteCandidate(null);
      case 'state': hook.remoteState = m.state; return undefined;
      case 'error':
        hook.errors.push(m.message);
        if (pc && pc.signalingState === 'have-local-offer') retryOffer();
        return banner(m.message, 'error');
      case 'token': return onToken(m);
      case 'stats': hook.stats = m; return undefined;
      case 'focus': return setKeyboard(!!m.editable);
      case 'clipboard': return copyOut(String(m.text || ''));
      default: return undefined;
    }
  }

  function onWelcome(m) {
    welcomed = true;
    wsBackoff = 500;
    hook.socketOpens++;
    clearBanner('socket');
    hook.viewerId = m.viewerId;
    iceServers = m.iceServers || iceServers;
    jpegFps = m.jpegFps || jpegFps;
    connectTimeoutMs = params.has('fallbackAfterMs') ? Number(params.get('fallbackAfterMs')) : (m.connectTimeoutMs || 5000);
    setControl(m.controlling);
    // A new socket is a new viewer to the streamer: start over.
    onStreamer(m.streamer, m.detail, true);
  }

  function onToken(m) {
    token = m.token;
    params.set('token', token);
    history.replaceState(null, '', location.pathname + '?' + params.toString());
  }

  function setControl(controlling) {
    const gained = !!controlling && !hook.controlling;
    hook.controlling = !!controlling;
    ui.control.textContent = controlling ? 'you control it' : 'watching (another viewer controls it)';
    if (gained) sendViewport(true);
  }

  function onStreamer(state, detail, fresh) {
    const before = hook.streamer;
    hook.streamer = state;
    if (state === 'running') {
      clearBanner('streamer');
      if (fresh || before !== 'running' || !pc) startPeer();
      return;
    }
    closePeer();
    setState('waiting');
    const why = {
      pending: 'Waiting for the browser to start…',
      starting: 'Waiting for the screen streamer to start…',
      restarting: 'The screen streamer is restarting; the picture comes back in a moment…',
      stopped: 'The screen streamer stopped.',
      unavailable: 'The live view is unavailable' + (detail ? ': ' + detail : '.'),
    }[state] || ('Streamer: ' + state);
    banner(why, 'streamer');
  }

  // ------------------------------------------------------------ WebRTC

  // The offer got an error instead of an answer: a new connection after a
  // while (the JPEG fallback, if armed, shows the screen meanwhile).
  function retryOffer() {
    clearTimeout(timers.retry);
    hook.offerRetries = (hook.offerRetries || 0) + 1;
    timers.retry = setTimeout(() => {
      if (!ended && hook.streamer === 'running' && (!pc || pc.connectionState !== 'connected')) startPeer();
    }, offerBackoff);
    offerBackoff = Math.min(offerBackoff * 2, 30000);
  }

  function closePeer() {
    clearTimeout(timers.retry);
    clearTimeout(timers.restart);
    clearTimeout(timers.fallback);
    clearInterval(timers.ping);
    restarting = false;
    pending = [];
    if (pc) pc.close();
    pc = null;
    dc = null;
    setConnection('closed');
  }

  function setConnection(s) {
    hook.connection = s;
    ui.connection.textContent = hook.fallback && s !== 'connected' ? 'JPEG fallback' : s;
  }

  function preferVp8(transceiver) {
    if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver || !RTCRtpReceiver.getCapabilities) return;
    const caps = RTCRtpReceiver.getCapabilities('video');
    if (!caps) return;
    const vp8 = caps.codecs.filter((c) => /vp8$/i.test(c.mimeType));
    const rest = caps.codecs.filter((c) => !/vp8$/i.test(c.mimeType));
    if (vp8.length) transceiver.setCodecPreferences(vp8.concat(rest));
  }

  function startPeer() {
    closePeer();
    if (ended) return;
    setState('connecting');
    hook.peers++;
    // A new viewer or a restarted streamer does not know about the
    // fallback yet.
    if (hook.fallback) send({ type: 'jpeg', fps: jpegFps });
    // ?iceTransportPolicy=relay forces TURN (to check a TURN server).
    const policy = params.get('iceTransportPolicy') === 'relay' ? 'relay' : 'all';
    const peer = new RTCPeerConnection({ iceServers, iceTransportPolicy: policy });
    pc = peer;
    hook.pc = peer;
    setConnection(peer.connectionState);
    preferVp8(peer.addTransceiver('video', { direction: 'recvonly' }));
    const channel = peer.createDataChannel('input', { ordered: true });
    dc = channel;
    channel.onopen = () => {
      timers.ping = setInterval(ping, 1000);
    };
    channel.onmessage = (e) => onChannelMessage(e.data);
    peer.ontrack = (e) => {
      // Typing must feel local: ask for the smallest jitter buffer rather
      // than smooth playback (a screen is mostly still between changes).
      if ('jitterBufferTarget' in e.receiver) e.receiver.jitterBufferTarget = 0;
      else if ('playoutDelayHint' in e.receiver) e.receiver.playoutDelayHint = 0;
      ui.video.srcObject = e.streams[0] || new MediaStream([e.track]);
      ui.video.play().catch(() => {});
    };
    peer.onicecandidate = (e) => {
      if (peer !== pc) return;
      if (!e.candidate) send({ type: 'endOfCandidates' });
      else if (e.candidate.candidate) {
        send({ type: 'candidate', candidate: e.candidate.candidate, sdpMLineIndex: e.candidate.sdpMLineIndex || 0 });
      }
    };
    peer.onconnectionstatechange = () => {
      if (peer === pc) onConnectionState(peer.connectionState);
    };
    peer.oniceconnectionstatechange = () => {
      const s = peer.iceConnectionState;
      if (peer === pc && (s === 'disconnected' || s === 'failed')) recover();
    };
    armFallback();
    offer(peer, false);
  }

  async function offer(peer, iceRestart) {
    try {
      const o = await peer.createOffer(iceRestart ? { iceRestart: true } : undefined);
      await peer.setLocalDescription(o);
      if (peer !== pc) return;
      pending = [];
      send({ type: 'offer', sdp: peer.localDescription.sdp, codec: 'vp8' });
    } catch (err) {
      hook.errors.push(String(err));
      banner('Could not make a WebRTC offer: ' + err.message, 'error');
    }
  }

  async function onAnswer(sdp) {
    const peer = pc;
    if (!peer || peer.signalingState !== 'have-local-offer') return;
    try {
      await peer.setRemoteDescription({ type: 'answer', sdp });
      const queued = pending;
      pending = [];
      for (const c of queued) await addCandidate(peer, c);
    } catch (err) {
      hook.errors.push(String(err));
      banner('The streamer\'s answer was not accepted: ' + err.message, 'error');
    }
  }

  // Candidates that arrive before their answer wait for it.
  function onRemoteCandidate(c) {
    if (!pc) return;
    if (pc.signalingState !== 'stable' || !pc.remoteDescription) pending.push(c);
    else addCandidate(pc, c);
  }

  async function addCandidate(peer, c) {
    try {
      await (c ? peer.addIceCandidate(c) : peer.addIceCandidate());
    } catch (err) {
      hook.errors.push('candidate: ' + err);
    }
  }

  function onConnectionState(s) {
    setConnection(s);
    if (s === 'connected') {
      setState('connected');
      clearTimeout(timers.restart);
      clearTimeout(timers.fallback);
      restarting = false;
      offerBackoff = 2000;
      clearBanner('peer');
      if (hook.fallback) stopFallback();
    } else if (s === 'failed') {
      recover();
    }
  }

  // ICE restart first (a new offer on the same connection); a fresh
  // connection when that does not reconnect in a few seconds.
  function recover() {
    if (restarting || !pc || ended) return;
    restarting = true;
    hook.iceRestarts++;
    setState('reconnecting');
    banner('The video connection was interrupted; reconnecting…', 'peer');
    const peer = pc;
    if (peer.restartIce) peer.restartIce();
    offer(peer, true);
    timers.restart = setTimeout(() => {
      restarting = false;
      if (peer === pc && peer.connectionState !== 'connected' && hook.streamer === 'running') startPeer();
    }, RESTART_GRACE_MS);
  }

  // ------------------------------------------------------------ fallback

  function armFallback() {
    clearTimeout(timers.fallback);
    if (hook.fallback) return;
    timers.fallback = setTimeout(() => {
      if (!pc || pc.connectionState !== 'connected') startFallback();
    }, connectTimeoutMs);
  }

  function startFallback() {
    hook.fallback = true;
    setState('fallback');
    send({ type: 'jpeg', fps: jpegFps });
    ui.img.hidden = false;
    ui.video.hidden = true;
    setConnection(hook.connection);
    banner('fallback: JPEG frames, WebRTC could not connect', 'fallback');
  }

  function stopFallback() {
    hook.fallback = false;
    send({ type: 'jpeg', fps: 0 });
    ui.img.hidden = true;
    ui.video.hidden = false;
    clearBanner('fallback');
  }

  function showJpeg(blob) {
    if (!hook.fallback) return;
    hook.jpegFrames++;
    const old = ui.img.src;
    ui.img.src = URL.createObjectURL(blob);
    if (old.startsWith('blob:')) URL.revokeObjectURL(old);
  }

  // ------------------------------------------------------------ data channel

  function ping() {
    if (dc && dc.readyState === 'open') dc.send(JSON.stringify({ type: 'ping', t: performance.now() }));
  }

  function onChannelMessage(data) {
    let m;
    try {
      m = JSON.parse(data);
    } catch (err) {
      return;
    }
    if (m.type === 'pong' && typeof m.t === 'number') {
      hook.rttMs = performance.now() - m.t;
      ui.rtt.textContent = hook.rttMs.toFixed(0) + ' ms';
    }
  }

  function countFrames() {
    if ('requestVideoFrameCallback' in HTMLVideoElement.prototype) {
      const frame = () => {
        hook.framesRendered++;
        ui.video.requestVideoFrameCallback(frame);
      };
      ui.video.requestVideoFrameCallback(frame);
    } else {
      setInterval(() => {
        const q = ui.video.getVideoPlaybackQuality && ui.video.getVideoPlaybackQuality();
        if (q) hook.framesRendered = q.totalVideoFrames - q.droppedVideoFrames;
      }, 500);
    }
  }

  // ------------------------------------------------------------ connection quality

  // A label (good / fair / poor) from the peer connection's own stats every
  // 2 s: loss over the interval, the selected pair's round trip and the
  // jitter; the figures go in its title and in hook.quality. Frame rate is
  // shown but not judged: a still screen sends a frame a second by design.
  const quality = { el: el('quality'), prev: null };

  function judgeQuality(q) {
    if (q.lossPct < 1 && q.rttMs < 150 && q.jitterMs < 30) return 'good';
    if (q.lossPct < 5 && q.rttMs < 400 && q.jitterMs < 100) return 'fair';
    return 'poor';
  }

  async function sampleQuality() {
    const peer = hook.pc;
    if (!peer || peer.connectionState !== 'connected' || !quality.el) return;
    const now = { lost: 0, received: 0, bytes: 0, fps: 0, jitter: 0, rtt: 0, at: performance.now() };
    (await peer.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'video') {
        now.lost += r.packetsLost || 0;
        now.received += r.packetsReceived || 0;
        now.bytes += r.bytesReceived || 0;
        now.fps = r.framesPerSecond || 0;
        now.jitter = (r.jitter || 0) * 1000;
      } else if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') {
        now.rtt = (r.currentRoundTripTime || 0) * 1000;
      }
    });
    const prev = quality.prev && quality.prev.peer === peer ? quality.prev : null;
    quality.prev = Object.assign(now, { peer });
    if (!prev) return;
    const lost = Math.max(0, now.lost - prev.lost);
    const total = lost + Math.max(0, now.received - prev.received);
    const q = {
      lossPct: total ? (100 * lost) / total : 0, rttMs: now.rtt, jitterMs: now.jitter, fps: now.fps,
      kbps: ((now.bytes - prev.bytes) * 8) / (now.at - prev.at),
    };
    q.label = judgeQuality(q);
    hook.quality = q;
    quality.el.textContent = q.label;
    quality.el.className = 'quality-' + q.label;
    quality.el.title = 'loss ' + q.lossPct.toFixed(1) + ' %, round trip ' + q.rttMs.toFixed(0) + ' ms, jitter '
      + q.jitterMs.toFixed(0) + ' ms, ' + q.fps.toFixed(0) + ' frames/s, ' + q.kbps.toFixed(0) + ' kbit/s';
  }

  function watchQuality() {
    setInterval(() => { sampleQuality().catch(() => {}); }, 2000);
  }

  // ------------------------------------------------------------ input

  // Over the data channel when it is open, else over the socket (the
  // fallback); only the controlling viewer's input counts.
  function sendInput(list) {
    if (!hook.controlling || ended) return;
    const msg = { type: 'input', events: list };
    if (dc && dc.readyState === 'open') dc.send(JSON.stringify(msg));
    else send(msg);
  }

  // Element coordinates to the screen's pixels, minus the letterbox.
  function screenPoint(ev) {
    const media = hook.fallback ? ui.img : ui.video;
    const w = hook.fallback ? ui.img.naturalWidth : ui.video.videoWidth;
    const h = hook.fallback ? ui.img.naturalHeight : ui.video.videoHeight;
    if (!w || !h) return null;
    const r = media.getBoundingClientRect();
    const scale = Math.min(r.width / w, r.height / h);
    const left = r.left + (r.width - w * scale) / 2;
    const top = r.top + (r.height - h * scale) / 2;
    const x = Math.round((ev.clientX - left) / scale);
    const y = Math.round((ev.clientY - top) / scale);
    return { x: Math.max(0, Math.min(w - 1, x)), y: Math.max(0, Math.min(h - 1, y)) };
  }

  function moveTo(ev) {
    const p = screenPoint(ev);
    return p ? [{ type: 'mouseMove', x: p.x, y: p.y }] : [];
  }

  function bindPointer() {
    let move = null;
    ui.stage.addEventListener('mousemove', (ev) => {
      const first = move === null;
      move = ev;
      if (!first) return;
      requestAnimationFrame(() => {
        const last = move;
        move = null;
        sendInput(moveTo(last));
      });
    });
    ui.stage.addEventListener('mousedown', (ev) => {
      ev.preventDefault();
      ui.keys.focus({ preventScroll: true });
      sendInput(moveTo(ev).concat([{ type: 'mouseDown', button: BUTTONS[ev.button] || 1 }]));
    });
    ui.stage.addEventListener('mouseup', (ev) => {
      ev.preventDefault();
      sendInput(moveTo(ev).concat([{ type: 'mouseUp', button: BUTTONS[ev.button] || 1 }]));
    });
    ui.stage.addEventListener('contextmenu', (ev) => ev.preventDefault());
    let acc = { x: 0, y: 0 };
    ui.stage.addEventListener('wheel', (ev) => {
      ev.preventDefault();
      // Pixels (about 100 a notch), lines (3 a notch) or pages, to steps.
      const unit = ev.deltaMode === 1 ? 1 / 3 : ev.deltaMode === 2 ? 3 : 1 / 100;
      acc = { x: acc.x + ev.deltaX * unit, y: acc.y + ev.deltaY * unit };
      const dx = Math.trunc(acc.x);
      const dy = Math.trunc(acc.y);
      if (!dx && !dy) return;
      acc = { x: acc.x - dx, y: acc.y - dy };
      const clamp = (n) => Math.max(-100, Math.min(100, n));
      sendInput(moveTo(ev).concat([{ type: 'scroll', dx: clamp(dx), dy: clamp(dy) }]));
    }, { passive: false });
  }

  // Touch, one finger at a time: a tap is a click, and gives the screen
  // the keyboard (on a phone that raises the on-screen one); a finger that
  // moves scrolls the page, as in a phone's own browser; a finger held
  // still for half a second and then moved drags (selects text, moves a
  // slider). Handled here, so the browser makes no mouse events of them.
  function bindTouch() {
    const SLOP_PX = 10;
    const HOLD_MS = 500;
    // Screen pixels Chromium scrolls for one wheel step.
    const STEP_PX = 53;
    const clamp = (n) => Math.max(-100, Math.min(100, n));
    let touch = null;
    let hold = 0;
    const mine = (ev) => touch && Array.from(ev.changedTouches).find((t) => t.identifier === touch.id);
    // Viewer pixels per screen pixel.
    const scale = () => {
      const media = hook.fallback ? ui.img : ui.video;
      const w = hook.fallback ? ui.img.naturalWidth : ui.video.videoWidth;
      const h = hook.fallback ? ui.img.naturalHeight : ui.video.videoHeight;
      const r = media.getBoundingClientRect();
      return w && h ? Math.min(r.width / w, r.height / h) : 1;
    };
    ui.stage.addEventListener('touchstart', (ev) => {
      ev.preventDefault();
      if (touch) return;
      const t = ev.changedTouches[0];
      touch = { id: t.identifier, x: t.clientX, y: t.clientY, last: t, mode: 'tap', acc: { x: 0, y: 0 } };
      clearTimeout(hold);
      hold = setTimeout(() => {
        if (!touch || touch.mode !== 'tap') return;
        touch.mode = 'drag';
        sendInput(moveTo(touch.last).concat([{ type: 'mouseDown', button: 1 }]));
      }, HOLD_MS);
    }, { passive: false });
    ui.stage.addEventListener('touchmove', (ev) => {
      ev.preventDefault();
      const t = mine(ev);
      if (!t) return;
      if (touch.mode === 'tap' && Math.hypot(t.clientX - touch.x, t.clientY - touch.y) > SLOP_PX) {
        touch.mode = 'scroll';
        clearTimeout(hold);
      }
      if (touch.mode === 'drag') sendInput(moveTo(t));
      if (touch.mode === 'scroll') {
        // The page follows the finger: moving it up scrolls down.
        const unit = 1 / (scale() * STEP_PX);
        touch.acc.x += (touch.last.clientX - t.clientX) * unit;
        touch.acc.y += (touch.last.clientY - t.clientY) * unit;
        const dx = Math.trunc(touch.acc.x);
        const dy = Math.trunc(touch.acc.y);
        if (dx || dy) {
          touch.acc = { x: touch.acc.x - dx, y: touch.acc.y - dy };
          sendInput(moveTo(t).concat([{ type: 'scroll', dx: clamp(dx), dy: clamp(dy) }]));
        }
      }
      touch.last = t;
    }, { passive: false });
    const end = (ev) => {
      ev.preventDefault();
      const t = mine(ev);
      if (!t) return;
      clearTimeout(hold);
      if (touch.mode === 'tap' && ev.type === 'touchend') {
        ui.keys.focus({ preventScroll: true });
        sendInput(moveTo(t).concat([{ type: 'mouseDown', button: 1 }, { type: 'mouseUp', button: 1 }]));
      } else if (touch.mode === 'drag') {
        sendInput(moveTo(t).concat([{ type: 'mouseUp', button: 1 }]));
      }
      touch = null;
    };
    ui.stage.addEventListener('touchend', end, { passive: false });
    ui.stage.addEventListener('touchcancel', end, { passive: false });
  }

  // Text as the person's own keyboard, dead keys and input method made it
  // (4096 characters at most, the agent's bound), inserted in the remote
  // page as is.
  function sendText(text) {
    const chars = Array.from(text || '').slice(0, 4096);
    if (chars.length) sendInput([{ type: 'text', text: chars.join('') }]);
  }

  function bindKeys() {
    const keys = window.airlockKeys;
    const box = ui.keys;
    const held = new Map();
    const isPaste = (ev) => (ev.ctrlKey || ev.metaKey) && !ev.altKey && (ev.key === 'v' || ev.key === 'V');
    // Option makes characters on a Mac; elsewhere Alt makes shortcuts.
    const mac = /Mac|iPhone|iPad/.test(navigator.platform || '');
    const textAlt = (ev) => !ev.altKey || (mac && !ev.ctrlKey && !ev.metaKey);
    // A key that makes a character (Shift and AltGr included) is left to
    // the textarea, whose input events bring the text; so are dead keys and
    // an input method's keys. Keys that make no text (Enter, Tab, arrows,
    // Backspace) and shortcuts go as keysyms.
    const makesText = (ev) => !ev.ctrlKey && !ev.metaKey && textAlt(ev) && Array.from(ev.key || '').length === 1;
    const composing = (ev) => ev.isComposing || ev.key === 'Dead' || ev.key === 'Process' || ev.keyCode === 229;
    // The keysym a key went down with is the one it comes up with, even
    // when Shift changed in between ('A' down, Shift up, 'a' up).
    const keyId = (ev) => ev.code || ev.key;
    box.addEventListener('keydown', (ev) => {
      if (isPaste(ev) || composing(ev) || makesText(ev)) return;
      const sym = (ev.repeat && held.get(keyId(ev))) || keys.keysym(ev);
      if (sym == null) return;
      ev.preventDefault(); // Tab, Enter and friends stay out of the textarea
      held.set(keyId(ev), sym);
      sendInput([{ type: 'keyDown', keysym: sym }]);
    });
    box.addEventListener('keyup', (ev) => {
      const sym = held.get(keyId(ev));
      if (sym == null) return; // made text, or pressed elsewhere
      held.delete(keyId(ev));
      ev.preventDefault();
      sendInput([{ type: 'keyUp', keysym: sym }]);
    });
    // Typed characters; a composition (dead key, input method) is sent
    // once, when it ends, whatever the browser's input events during it.
    box.addEventListener('input', (ev) => {
      if (ev.isComposing || ev.inputType === 'insertCompositionText') return;
      if (ev.inputType === 'insertText' || ev.inputType === 'insertReplacementText') sendText(ev.data);
      box.value = '';
    });
    box.addEventListener('compositionend', (ev) => {
      sendText(ev.data);
      box.value = '';
    });
    // Keys still down when the screen loses focus would stick.
    box.addEventListener('blur', () => {
      const ups = Array.from(held.values()).map((sym) => ({ type: 'keyUp', keysym: sym }));
      held.clear();
      if (ups.length) sendInput(ups);
    });
    document.addEventListener('paste', (ev) => {
      if (document.activeElement !== box) return;
      ev.preventDefault();
      const text = (ev.clipboardData && ev.clipboardData.getData('text/plain')) || '';
      // Control (or Command) is still down from Ctrl+V: release it, or
      // whatever is pressed next would be a shortcut.
      const ups = [];
      for (const [code, sym] of held) {
        if (keys.isModifier(sym)) {
          ups.push({ type: 'keyUp', keysym: sym });
          held.delete(code);
        }
      }
      if (ups.length) sendInput(ups);
      sendText(text);
    });
  }

  // ------------------------------------------------------------ page notes

  // The remote page's focus decides whether a phone's on-screen keyboard
  // shows: the keys element keeps the focus a tap gave it, and its
  // inputmode switches the keyboard on when an editable element has the
  // remote focus, off when not (physical keyboards type either way).
  function setKeyboard(editable) {
    hook.remoteEditable = editable;
    ui.keys.inputMode = editable ? 'text' : 'none';
  }

  // Text the person copied in the remote page (only when the operator
  // allows copying out): onto this device's clipboard.
  function copyOut(text) {
    if (!text || !navigator.clipboard) return;
    navigator.clipboard.writeText(text).then(
      () => { hook.copies += 1; },
      () => banner('Copied text could not be put on your clipboard (this browser refused).', 'error'),
    );
  }

  // ------------------------------------------------------------ viewport

  // The remote screen follows the stage's size (within airlockd's bounds;
  // a phone in portrait gets a portrait page, touch devices the mobile
  // layout): sent by the controlling viewer when it gets control and when
  // the stage settles at a new size. The page is drawn at this device's
  // pixel ratio as far as the bounds allow.
  let sentViewport = '';
  function sendViewport(force) {
    if (!hook.controlling || ended) return;
    const r = ui.stage.getBoundingClientRect();
    const v = {
      type: 'viewport', width: Math.round(r.width), height: Math.round(r.height),
      scale: Math.round((window.devicePixelRatio || 1) * 1000) / 1000,
      mobile: matchMedia('(pointer: coarse)').matches,
    };
    if (v.width < 100 || v.height < 100) return;
    const key = JSON.stringify(v);
    if (!force && key === sentViewport) return;
    sentViewport = key;
    hook.viewport = v;
    sendInput([v]);
  }

  function followViewport() {
    let settle = null;
    new ResizeObserver(() => {
      clearTimeout(settle);
      settle = setTimeout(() => sendViewport(false), 300);
    }).observe(ui.stage);
  }

  // ------------------------------------------------------------ start

  async function start() {
    if (!token) return end('This link has no viewer token; open the viewerUrl of the session.', 'refused');
    countFrames();
    watchQuality();
    bindPointer();
    bindTouch();
    bindKeys();
    followViewport();
    if (!(await checkAccess())) return undefined;
    openEvents();
    openSocket();
    return undefined;
  }

  start();
})();
