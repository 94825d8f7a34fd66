// farmer dashboard: live updates by server-sent events, and the admin
// buttons of the build page. Everything the server sends is rendered and
// escaped by the server; log text is added as text, never as HTML.
(function () {
  'use strict';

  var state = document.getElementById('live-state');
  function showState(text) {
    if (!state) return;
    state.textContent = text;
    state.hidden = !text;
  }

  function handleHtml(e) {
    var m = JSON.parse(e.data);
    var el = document.getElementById(m.target);
    if (el) el.innerHTML = m.html;
  }

  // Grid cells: [[row, column, "<td>...</td>"], ...]
  function handleCells(e) {
    var table = document.querySelector('#grid table.grid');
    if (!table) return;
    var lead = parseInt(table.getAttribute('data-lead'), 10) || 0;
    JSON.parse(e.data).forEach(function (c) {
      var row = table.tBodies[0].rows[c[0]];
      var cell = row && row.cells[lead + c[1]];
      if (cell) cell.outerHTML = c[2];
    });
  }

  function open(url, handlers) {
    var es = new EventSource(url);
    es.onopen = function () { showState(''); };
    es.onerror = function () {
      if (es.readyState !== EventSource.CLOSED) showState('reconnecting…');
    };
    Object.keys(handlers).forEach(function (k) {
      es.addEventListener(k, function (e) { handlers[k](e, es); });
    });
    return es;
  }

  document.querySelectorAll('[data-live]').forEach(function (el) {
    open(el.getAttribute('data-live'), { html: handleHtml, cells: handleCells });
  });

  // The build page's live log.
  var log = document.getElementById('log');
  if (log && log.getAttribute('data-log')) {
    var logState = document.getElementById('log-state');
    var lines = 0;
    open(log.getAttribute('data-log'), {
      html: handleHtml,
      log: function (e) {
        var text = JSON.parse(e.data);
        var box = log.getBoundingClientRect();
        var follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 30;
        var pageFollow = box.bottom <= window.innerHeight + 40;
        log.appendChild(document.createTextNode(text));
        lines += (text.match(/\n/g) || []).length;
        log.setAttribute('data-lines', String(lines));
        if (follow) log.scrollTop = log.scrollHeight;
        if (pageFollow) window.scrollTo(0, document.body.scrollHeight);
        if (logState) logState.textContent = 'Following the log live.';
      },
      end: function (e, es) {
        es.close();
        showState('');
        log.setAttribute('data-ended', '1');
        if (logState) logState.textContent = 'The build is over; reload for the stored log of each step.';
      }
    });
  }

  // Admin actions on the build page, through the JSON API.
  var admin = document.getElementById('admin');
  if (admin) {
    var KEY = 'farmer-admin-token';
    var input = document.getElementById('admin-token');
    var msg = document.getElementById('admin-msg');
    var id = admin.getAttribute('data-build');
    try { input.value = localStorage.getItem(KEY) || ''; } catch (err) { /* storage off */ }
    input.addEventListener('change', function () {
      try { localStorage.setItem(KEY, input.value.trim()); } catch (err) { /* storage off */ }
    });
    admin.addEventListener('click', function (e) {
      var action = e.target && e.target.getAttribute('data-action');
      if (!action) return;
      if (action === 'forget') {
        try { localStorage.removeItem(KEY); } catch (err) { /* storage off */ }
        input.value = '';
        msg.textContent = 'Token forgotten.';
        return;
      }
      var token = input.value.trim();
      if (!token) { msg.textContent = 'Paste the admin token first.'; return; }
      try { localStorage.setItem(KEY, token); } catch (err) { /* storage off */ }
      msg.textContent = action === 'rebuild' ? 'Asking for a rebuild…' : 'Cancelling…';
      fetch('/api/builds/' + encodeURIComponent(id) + '/' + action, {
        method: 'POST',
        headers: { 'Authorization': 'Bearer ' + token }
      }).then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (j) {
          if (!r.ok) { msg.textContent = 'Refused (' + r.status + '): ' + (j.error || r.statusText); return; }
          if (action === 'rebuild' && j.id) {
            msg.textContent = 'Rebuild queued as build ' + j.id + '.';
            window.location.href = '/builds/' + encodeURIComponent(j.id);
          } else {
            msg.textContent = j.message || 'Done.';
          }
        });
      }, function (err) { msg.textContent = 'Request failed: ' + err; });
    });
  }
})();

// Builder requests (/requests): list, approve and reject with the admin token.
(function () {
  var box = document.getElementById('requests-admin');
  if (!box) { return; }
  var KEY = 'farmer-admin-token';
  var input = document.getElementById('requests-token');
  var msg = document.getElementById('requests-msg');
  var rows = document.getElementById('requests-rows');
  var hostTypes = (box.getAttribute('data-host-types') || '').split(',').filter(Boolean);
  try { input.value = localStorage.getItem(KEY) || ''; } catch (err) { /* storage off */ }
  function cell(tr, text) { var td = document.createElement('td'); td.textContent = text; tr.appendChild(td); return td; }
  function call(method, path, body) {
    var token = input.value.trim();
    try { localStorage.setItem(KEY, token); } catch (err) { /* storage off */ }
    return fetch(path, {
      method: method,
      headers: { 'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json' },
      body: body ? JSON.stringify(body) : undefined
    }).then(function (r) {
      return r.json().then(function (v) { if (!r.ok) { throw new Error(v.error || r.statusText); } return v; });
    });
  }
  function load() {
    msg.textContent = 'loading…';
    call('GET', '/api/requests').then(function (list) {
      msg.textContent = list.length + ' request(s)';
      rows.textContent = '';
      list.forEach(function (q) {
        var tr = document.createElement('tr');
        cell(tr, String(q.id)); cell(tr, q.status + (q.host_type ? ' (' + q.host_type + ')' : '') + (q.reason ? ': ' + q.reason : ''));
        cell(tr, q.hostname); cell(tr, q.contact); cell(tr, q.notes);
        var td = cell(tr, '');
        if (q.status === 'pending') {
          var sel = document.createElement('select');
          hostTypes.forEach(function (h) { var o = document.createElement('option'); o.value = h; o.textContent = h; sel.appendChild(o); });
          var ok = document.createElement('button'); ok.type = 'button'; ok.textContent = 'Approve';
          ok.addEventListener('click', function () {
            call('POST', '/api/requests/' + q.id + '/approve', { host_type: sel.value }).then(load, function (e) { msg.textContent = e.message; });
          });
          var reason = document.createElement('input'); reason.placeholder = 'reason to reject';
          var no = document.createElement('button'); no.type = 'button'; no.textContent = 'Reject';
          no.addEventListener('click', function () {
            call('POST', '/api/requests/' + q.id + '/reject', { reason: reason.value }).then(load, function (e) { msg.textContent = e.message; });
          });
          td.appendChild(sel); td.appendChild(ok); td.appendChild(reason); td.appendChild(no);
        }
        rows.appendChild(tr);
      });
    }, function (e) { msg.textContent = e.message; });
  }
  document.getElementById('requests-load').addEventListener('click', load);
  if (input.value) { load(); }
})();

// Build page: a failure's "log line N" opens its step's log and shows the
// line; the page opens with the first failure's line in view in its log.
(function () {
  function show(id, scrollPage) {
    var line = document.getElementById(id);
    if (!line) {
      // A line before the part of the log the page shows: the raw log has it.
      var build = document.getElementById('admin');
      if (scrollPage && build) { location.href = '/api/builds/' + build.getAttribute('data-build') + '/log'; }
      return;
    }
    var d = line.closest('details');
    if (d) { d.open = true; }
    document.querySelectorAll('pre.log .hit').forEach(function (e) { e.classList.remove('hit'); });
    line.classList.add('hit');
    var pre = line.closest('pre');
    if (pre) { pre.scrollTop = Math.max(0, line.offsetTop - pre.clientHeight / 3); }
    if (scrollPage) { line.scrollIntoView({ block: 'center' }); }
  }
  document.addEventListener('click', function (e) {
    var a = e.target.closest && e.target.closest('a.to-log');
    if (!a) { return; }
    e.preventDefault();
    var id = a.getAttribute('data-line');
    history.replaceState(null, '', '#' + id);
    show(id, true);
  });
  var hash = location.hash.slice(1);
  if (hash && document.getElementById(hash)) {
    show(hash, true);
  } else {
    var first = document.querySelector('#first-failure a.to-log');
    if (first) { show(first.getAttribute('data-line'), false); }
  }
})();
