// airlock: the "connect a CLI" page (/session/new), for operators. Lists
// the providers from /api/auth/providers, starts a session with POST
// /api/auth/start and opens the session's live view (its viewerUrl, on
// the viewers' listener). The operator API on TCP needs an operator
// token: asked for here, kept for this tab only (sessionStorage).
'use strict';

(function () {
  const form = document.getElementById('start');
  const select = document.getElementById('provider');
  const user = document.getElementById('user');
  const banner = document.getElementById('banner');
  const token = document.getElementById('token');
  const KEY = 'airlockOperatorToken';
  token.value = sessionStorage.getItem(KEY) || '';

  function auth(headers) {
    const t = token.value.trim();
    if (t) headers.authorization = 'Bearer ' + t;
    return headers;
  }

  function say(text) {
    banner.textContent = text;
    banner.hidden = !text;
    banner.className = text ? 'fatal' : '';
  }

  async function loadProviders() {
    say('');
    select.replaceChildren();
    try {
      const r = await fetch('/api/auth/providers', { cache: 'no-store', headers: auth({}) });
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
        headers: auth({ 'content-type': 'application/json' }),
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

  token.addEventListener('change', () => {
    sessionStorage.setItem(KEY, token.value.trim());
    loadProviders();
  });

  loadProviders();
})();
