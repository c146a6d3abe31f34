// airlock: the "connect a CLI" page (/session/new). Lists the providers
// from /api/auth/providers, starts a session with POST /api/auth/start
// and opens the session's live view (its viewerUrl).
'use strict';

(function () {
  const form = document.getElementById('start');
  const select = document.getElementById('provider');
  const user = document.getElementById('user');
  const banner = document.getElementById('banner');

  function say(text) {
    banner.textContent = text;
    banner.hidden = !text;
    banner.className = text ? 'fatal' : '';
  }

  async function loadProviders() {
    try {
      const r = await fetch('/api/auth/providers', { cache: 'no-store' });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error || r.statusText);
      for (const p of body.providers) {
        const o = document.createElement('option');
        o.value = p.name;
        o.textContent = p.displayName + ' (' + p.name + ')';
        select.appendChild(o);
      }
    } catch (e) {
      say('Cannot list the providers: ' + e.message);
    }
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    say('');
    document.getElementById('go').disabled = true;
    try {
      const r = await fetch('/api/auth/start', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ userId: user.value, provider: select.value }),
      });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error || r.statusText);
      location.assign(body.viewerUrl);
    } catch (e) {
      say('The session did not start: ' + e.message);
      document.getElementById('go').disabled = false;
    }
  });

  loadProviders();
})();
