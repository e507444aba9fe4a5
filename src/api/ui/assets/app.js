// The dashboard's only script: it keeps pages live. It never sees a token
// (the session cookie is HttpOnly) and inserts only markup the server
// rendered and escaped, or text through textContent.
"use strict";

(function () {
  var TERMINAL = { succeeded: true, dead: true, cancelled: true };

  function refresh(el) {
    var active = document.activeElement;
    // Never swap markup under someone's cursor.
    if (active && active !== document.body && el.contains(active)) {
      return Promise.resolve();
    }
    return fetch(el.dataset.live, {
      headers: { "Accept": "text/html", "X-Orch-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) {
        window.location.assign("/ui/login");
        return null;
      }
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html !== null) {
        el.innerHTML = html;
      }
    }).catch(function () { /* the next tick tries again */ });
  }

  function poll(el) {
    var every = parseInt(el.dataset.every, 10);
    if (!(every > 0)) {
      return;
    }
    // The next fetch waits for the last one, so a slow answer can never
    // overwrite a newer one.
    function tick() {
      var done = document.hidden ? Promise.resolve() : refresh(el);
      done.then(function () { window.setTimeout(tick, every); });
    }
    window.setTimeout(tick, every);
  }

  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function follow(log) {
    var live = document.getElementById("live");
    var trail = document.querySelector("#events tbody");
    var source = new EventSource(log.dataset.events);
    var pending = null;
    // Set when the stream carried the job's last event: the server ends
    // the stream then, and it must not be reopened (even if the summary
    // could not be refreshed because someone is typing in it).
    var ended = false;

    function finished() {
      var summary = live && live.querySelector(".summary");
      return ended || (summary && summary.dataset.terminal === "true");
    }

    function update() {
      if (pending !== null || !live) {
        return;
      }
      pending = window.setTimeout(function () {
        pending = null;
        // Not closed here even when the summary says finished: the
        // stream may still carry the last events, and the server ends it
        // once they are sent.
        refresh(live);
      }, 150);
    }

    source.onmessage = function (message) {
      var event;
      try {
        event = JSON.parse(message.data);
      } catch (e) {
        return;
      }
      if (event.type === "log") {
        var line = document.createElement("div");
        var data = event.data || {};
        line.className = "line " + (data.stream === "stderr" ? "stderr" : "stdout");
        line.textContent = String(data.line || "");
        var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.appendChild(line);
        if (atBottom) {
          log.scrollTop = log.scrollHeight;
        }
        return;
      }
      if (trail) {
        var row = document.createElement("tr");
        cell(row, String(event.id)).className = "num";
        cell(row, String(event.at));
        cell(row, String(event.type));
        cell(row, String(event.actor));
        var data = cell(row, "");
        var code = document.createElement("code");
        code.className = "data";
        code.textContent = event.data === null ? "" : JSON.stringify(event.data);
        data.appendChild(code);
        trail.appendChild(row);
      }
      if (TERMINAL[event.type]) {
        ended = true;
      }
      update();
    };
    source.onerror = function () {
      // The server ends the stream once the job has finished; otherwise
      // EventSource reconnects by itself, resuming after the last event.
      if (finished()) {
        source.close();
      }
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(poll);
    var log = document.getElementById("log");
    if (log && log.dataset.events) {
      follow(log);
    }
  });
})();
