// Charts of the job and users pages (Chart.js, shipped in static/vendor) and the
// confirmation of job actions. Data comes from data-* attributes the server wrote.
(function () {
  "use strict";
  var usage = document.getElementById("usage-chart");
  if (usage && window.Chart) {
    var s = JSON.parse(usage.dataset.samples);
    var labels = [], cpu = [], mem = [];
    for (var i = 0; i < s.length; i++) {
      labels.push(s[i].label);  // the server's zone, as the page's times (not the browser's)
      mem.push(s[i].mem_bytes === null ? null : s[i].mem_bytes / 1048576);
      // CPU cores in use over each interval: counter difference over time difference.
      if (i === 0 || s[i].cpu_us === null || s[i - 1].cpu_us === null) { cpu.push(null); }
      else { cpu.push((s[i].cpu_us - s[i - 1].cpu_us) / 1e6 / Math.max(s[i].t - s[i - 1].t, 1e-3)); }
    }
    new Chart(usage, {
      type: "line",
      data: { labels: labels, datasets: [
        { label: "CPU (cores)", data: cpu, yAxisID: "cpu", borderColor: "#1d3557" },
        { label: "Memory (MiB)", data: mem, yAxisID: "mem", borderColor: "#e63946" }] },
      options: { animation: false, maintainAspectRatio: false,
        scales: { cpu: { position: "left", beginAtZero: true },
                  mem: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } } }
    });
  }

  var daily = document.getElementById("daily-chart");
  if (daily && window.Chart) {
    var rows = JSON.parse(daily.dataset.days), days = [], users = {};
    rows.forEach(function (r) {
      var d = new Date(r.day * 1000).toISOString().slice(0, 10);
      if (days.indexOf(d) < 0) { days.push(d); }
      // null: no record measured CPU time (a gap in the bar, not 0)
      (users[r.user] = users[r.user] || {})[d] = r.cpu_us === null ? null : r.cpu_us / 3.6e9;
    });
    var sets = Object.keys(users).map(function (u) {
      return { label: u, data: days.map(function (d) { return d in users[u] ? users[u][d] : 0; }) };
    });
    new Chart(daily, { type: "bar", data: { labels: days, datasets: sets },
      options: { animation: false, maintainAspectRatio: false,
        scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "CPU hours" } } } } });
  }

  document.querySelectorAll("form.action").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.dataset.confirm)) { ev.preventDefault(); return; }
      f.querySelector("input[name=confirm]").value = "yes";
    });
  });
})();
