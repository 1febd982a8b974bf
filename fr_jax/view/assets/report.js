// The fr_jax run viewer: renders the data embedded in index.html; a sample's page loads its data file on demand.
(function () {
  "use strict";
  const FR = JSON.parse(document.getElementById("fr-data").textContent);
  const IDX = FR.index;
  const COUNT = (IDX.source || []).length;
  const PAGE = 50;
  const main = document.getElementById("main");

  // ------------------------------------------------------------------------------------------------ helpers
  function esc(value) {
    return String(value === null || value === undefined ? "" : value)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function num(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "";
    if (typeof value !== "number") return esc(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    const abs = Math.abs(value);
    if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(2);
    return value.toFixed(digits === undefined ? 3 : digits);
  }
  function pre(text, cls) {
    return `<pre${cls ? ` class="${cls}"` : ""}>${esc(text)}</pre>`;
  }
  function runName(r) { return FR.runs[r].name; }
  function sourceLabel(s) {
    const src = FR.sources[s];
    return (FR.runs.length > 1 ? runName(src.run) + ": " : "") + src.label;
  }
  function params(query) {
    const out = {};
    new URLSearchParams(query || "").forEach((v, k) => { out[k] = v; });
    return out;
  }

  // --------------------------------------------------------------------------------------- lazy sample data
  const chunks = {};
  const waiting = {};
  window.frChunk = function (name, data) {
    chunks[name] = data;
    (waiting[name] || []).forEach((done) => done[0](data));
    delete waiting[name];
  };
  function loadChunk(k) {
    const name = FR.chunks[k];
    if (chunks[name]) return Promise.resolve(chunks[name]);
    return new Promise((resolve, reject) => {
      const first = !waiting[name];
      (waiting[name] = waiting[name] || []).push([resolve, reject]);
      if (!first) return;
      const script = document.createElement("script");
      script.src = "data/" + name + ".js" + (FR.live ? "?b=" + FR.build : "");
      script.onerror = () => {
        (waiting[name] || []).forEach((done) => done[1](new Error("could not load data/" + name + ".js")));
        delete waiting[name];
      };
      document.head.appendChild(script);
    });
  }
  function loadSample(i) {
    return loadChunk(IDX.chunk[i]).then((chunk) => {
      const detail = chunk.samples[IDX.offset[i]];
      return Object.assign({}, detail, { prompt: chunk.prompts[detail.prompt_sha] });
    });
  }

  // ------------------------------------------------------------------------------------------------- curves
  function chart(curve) {
    const W = 330, H = 190, L = 52, R = 10, T = 8, B = 24;
    const xs = [], ys = [];
    curve.series.forEach((s) => { xs.push(...s.x); ys.push(...s.y); });
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
    let svg = `<svg class="chart" data-key="${esc(curve.key)}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`;
    svg += `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/>`;
    svg += `<line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`;
    [y0, (y0 + y1) / 2, y1].forEach((y) => {
      svg += `<text x="${L - 4}" y="${sy(y) + 3}" text-anchor="end">${num(y)}</text>`;
    });
    svg += `<text x="${L}" y="${H - 8}">${num(x0, 0)}</text>`;
    svg += `<text x="${W - R}" y="${H - 8}" text-anchor="end">${num(x1, 0)}</text>`;
    svg += `<text x="${(L + W) / 2}" y="${H - 8}" text-anchor="middle">step</text>`;
    curve.series.forEach((s) => {
      const color = FR.runs[s.run].color;
      const points = s.x.map((x, j) => `${sx(x).toFixed(1)},${sy(s.y[j]).toFixed(1)}`).join(" ");
      svg += `<polyline stroke="${color}" points="${points}"/>`;
      s.x.forEach((x, j) => {
        svg += `<circle class="pt" r="2.5" fill="${color}" cx="${sx(x).toFixed(1)}" cy="${sy(s.y[j]).toFixed(1)}">` +
          `<title>${esc(runName(s.run))} step ${x}: ${num(s.y[j], 4)}</title></circle>`;
      });
    });
    return `<figure class="curve"><figcaption>${esc(curve.title)}</figcaption>${svg}</svg></figure>`;
  }
  function renderCurves() {
    if (!FR.sections.length) {
      main.innerHTML = "<p class=\"muted\">No metrics.jsonl in these runs yet.</p>";
      return;
    }
    main.innerHTML = FR.sections.map((section) =>
      `<h2>${esc(section.title)}</h2><div class="section">${section.curves.map(chart).join("")}</div>`).join("");
  }

  // ------------------------------------------------------------------------------------------- sample index
  const FILTERS = ["source", "task", "rmin", "rmax", "outcome", "op", "flag", "q"];
  const lowered = {};
  function searchText(i) {
    if (lowered[i] === undefined) lowered[i] = (IDX.task[i] + "\n" + IDX.text[i]).toLowerCase();
    return lowered[i];
  }
  const TASKS = new Set(IDX.task || []);
  function matches(i, f) {
    if (f.source !== undefined && f.source !== "" && String(IDX.source[i]) !== f.source) return false;
    if (f.task) {
      if (TASKS.has(f.task) ? IDX.task[i] !== f.task : !IDX.task[i].toLowerCase().includes(f.task.toLowerCase())) {
        return false;
      }
    }
    if (f.rmin !== undefined && f.rmin !== "" && !(IDX.reward[i] >= Number(f.rmin))) return false;
    if (f.rmax !== undefined && f.rmax !== "" && !(IDX.reward[i] <= Number(f.rmax))) return false;
    if (f.outcome && IDX.outcome[i] !== f.outcome) return false;
    if (f.op && !IDX.ops[i].includes(f.op)) return false;
    if (f.flag === "any" && !IDX.flags[i].length) return false;
    if (f.flag && f.flag !== "any" && !IDX.flags[i].some((x) => x.startsWith(f.flag + ":"))) return false;
    if (f.q && !searchText(i).includes(f.q.toLowerCase())) return false;
    return true;
  }
  function distinct(column, flatten) {
    const seen = new Set();
    (IDX[column] || []).forEach((v) => (flatten ? v : [v]).forEach((x) => seen.add(flatten === "category" ? x.split(":")[0] : x)));
    return [...seen].sort();
  }
  function options(values, selected, labels) {
    return values.map((v, j) => `<option value="${esc(v)}"${String(v) === selected ? " selected" : ""}>${esc(labels ? labels[j] : v)}</option>`).join("");
  }
  function filterForm(f) {
    const sourceIds = FR.sources.map((_, s) => String(s));
    return `<form class="filters" id="filters" onsubmit="return false">
      <label>records<select name="source"><option value="">all</option>${options(sourceIds, f.source, sourceIds.map(sourceLabel))}</select></label>
      <label>task<input name="task" list="task-list" value="${esc(f.task || "")}" placeholder="task id"></label>
      <datalist id="task-list">${options([...TASKS].sort(), "")}</datalist>
      <label>reward &ge;<input name="rmin" type="number" step="any" value="${esc(f.rmin || "")}"></label>
      <label>reward &le;<input name="rmax" type="number" step="any" value="${esc(f.rmax || "")}"></label>
      <label>outcome / failure<select name="outcome"><option value="">any</option>${options(distinct("outcome"), f.outcome)}</select></label>
      <label>operator<select name="op"><option value="">any</option>${options(distinct("ops", true), f.op)}</select></label>
      <label>flag<select name="flag"><option value="">any or none</option><option value="any"${f.flag === "any" ? " selected" : ""}>any flag</option>${options(distinct("flags", "category"), f.flag)}</select></label>
      <label>search<input name="q" type="search" value="${esc(f.q || "")}" placeholder="text in the answer, design or code"></label>
    </form>`;
  }
  function sampleTable(ids, page, showFlags) {
    const rows = ids.slice(page * PAGE, (page + 1) * PAGE).map((i) => {
      const tests = IDX.total[i] ? `${IDX.passed[i]}/${IDX.total[i]}` : "";
      const flags = showFlags ? IDX.flags[i].map((x) => `<span class="flag">${esc(x)}</span>`).join("")
        : IDX.flags[i].map((x) => `<span class="flag" title="${esc(x)}">${esc(x.split(":")[0])}</span>`).join("");
      return `<tr class="sample-row" data-id="${i}"><td class="num"><a href="#sample/${i}">${i}</a></td>
        <td>${esc(sourceLabel(IDX.source[i]))}</td><td>${esc(IDX.task[i])}</td>
        <td class="num">${IDX.group[i]}.${IDX.sample[i]}</td><td class="num">${num(IDX.reward[i])}</td>
        <td class="num">${tests}</td><td class="outcome-${esc(IDX.outcome[i])}">${esc(IDX.outcome[i])}</td>
        <td>${esc(IDX.ops[i].join(", "))}</td><td class="num">${num(IDX.tokens[i])}</td><td>${flags}</td></tr>`;
    }).join("");
    const pages = Math.max(1, Math.ceil(ids.length / PAGE));
    return `<div class="pager"><button data-page="${page - 1}"${page <= 0 ? " disabled" : ""}>&larr; previous</button>
      <button data-page="${page + 1}"${page + 1 >= pages ? " disabled" : ""}>next &rarr;</button>
      <span id="match-count">${ids.length}</span> of ${COUNT} samples, page ${page + 1} of ${pages}</div>
      <table id="sample-table"><thead><tr><th>#</th><th>records</th><th>task</th><th>group.sample</th><th>reward</th>
      <th>tests</th><th>outcome</th><th>operators</th><th>tokens</th><th>flags</th></tr></thead><tbody>${rows}</tbody></table>`;
  }
  function renderSamples(tab, query) {
    const f = params(query);
    if (tab === "suspicious" && !f.flag) f.flag = "any";
    const page = Math.max(0, Number(f.page || 0));
    main.innerHTML = (tab === "suspicious"
      ? "<p>Samples that passed every test with a very short or odd solution, groups whose samples are all the same, and outputs that hit a budget: a list to start a reward-hacking look from.</p>"
      : "") + filterForm(f) + `<div id="results"></div>`;
    const form = document.getElementById("filters");
    const results = document.getElementById("results");
    function current() {
      const out = {};
      FILTERS.forEach((k) => { const v = form.elements[k].value; if (v !== "") out[k] = v; });
      return out;
    }
    function show(filter, pageIndex) {
      const ids = [];
      for (let i = 0; i < COUNT; i++) if (matches(i, filter)) ids.push(i);
      results.innerHTML = sampleTable(ids, pageIndex, tab === "suspicious");
      results.querySelectorAll("button[data-page]").forEach((b) => b.addEventListener("click", () => {
        update(Number(b.dataset.page));
      }));
      results.querySelectorAll("tr.sample-row").forEach((tr) => tr.addEventListener("click", (event) => {
        if (event.target.tagName !== "A") location.hash = "#sample/" + tr.dataset.id;
      }));
    }
    function update(pageIndex) {
      const filter = current();
      const query = new URLSearchParams(Object.assign({}, filter, pageIndex ? { page: pageIndex } : {})).toString();
      history.replaceState(null, "", "#" + tab + (query ? "?" + query : ""));
      show(filter, pageIndex);
    }
    ["input", "change"].forEach((event) => form.addEventListener(event, () => update(0)));
    show(current(), page);
  }

  // ----------------------------------------------------------------------------------------- a sample's page
  function flowSvg(flow) {
    const rank = flow.nodes.map(() => 0);
    flow.edges.forEach(([a, b]) => { rank[b] = Math.max(rank[b], rank[a] + 1); });  // edges go forward in id order
    flow.nodes.forEach((n) => { if (n.id !== 0 && rank[n.id] === 0) rank[n.id] = 1; });
    const columns = {};
    flow.nodes.forEach((n) => { (columns[rank[n.id]] = columns[rank[n.id]] || []).push(n.id); });
    const BW = 170, BH = 42, GX = 120, GY = 26;
    const place = {};
    let height = 0;
    Object.keys(columns).forEach((c) => {
      columns[c].forEach((id, row) => { place[id] = [20 + c * (BW + GX), 16 + row * (BH + GY)]; });
      height = Math.max(height, 16 + columns[c].length * (BH + GY));
    });
    const width = 40 + (Math.max(...rank) + 1) * (BW + GX) - GX;
    const labels = {};
    flow.edges.forEach(([a, b, arg]) => {
      const key = a + ">" + b;
      labels[key] = labels[key] || [];
      if (arg) labels[key].push(arg);
    });
    let svg = `<svg class="flow" id="design-graph" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`;
    svg += "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#777\"/></marker></defs>";
    Object.keys(labels).forEach((key) => {
      const [a, b] = key.split(">").map(Number);
      const [ax, ay] = place[a], [bx, by] = place[b];
      const x1 = ax + BW, y1 = ay + BH / 2, x2 = bx, y2 = by + BH / 2, mx = (x1 + x2) / 2;
      svg += `<path class="edge" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}" marker-end="url(#arrow)"/>`;
      if (labels[key].length) {
        svg += `<text class="small" x="${mx}" y="${(y1 + y2) / 2 - 5}" text-anchor="middle">${esc(labels[key].join(", "))}</text>`;
      }
    });
    flow.nodes.forEach((n) => {
      const [x, y] = place[n.id];
      const io = n.operator === null;
      svg += `<g class="op-node" data-operator="${esc(n.operator || n.label)}"><rect class="${io ? "io" : ""}${n.loop ? " loop" : ""}" x="${x}" y="${y}" width="${BW}" height="${BH}" rx="4"/>`;
      svg += `<text x="${x + 8}" y="${y + 17}">${esc(io ? n.label : n.operator)}</text>`;
      svg += `<text class="small" x="${x + 8}" y="${y + 33}">${esc(io ? "" : "self." + n.label)}${n.loop ? " (in a loop)" : ""}${n.line ? " line " + n.line : ""}</text></g>`;
    });
    return svg + "</svg>";
  }
  function testTable(title, evaluation) {
    if (!evaluation) return "";
    let out = `<h3>${esc(title)}</h3>`;
    if (evaluation.load_error) {
      const e = evaluation.load_error;
      out += `<p class="warn">load error in ${esc(e.step)}: ${esc(e.type)}: ${esc(e.message)}</p>`;
    }
    if (evaluation.status === "SandboxError") out += `<p class="warn">the sandbox could not judge it: ${esc(evaluation.message)}</p>`;
    const rows = (evaluation.tests || []).map((t) => `<tr class="test-row ${t.passed ? "pass" : "fail"}">
      <td>${esc(t.name)}</td><td class="${t.passed ? "outcome-passed" : "outcome-failed"}">${t.passed ? "pass" : "fail"}</td>
      <td>${esc(t.status)}</td><td>${esc(t.error_type)}</td><td>${t.error_message ? pre(t.error_message) : ""}</td>
      <td class="num">${num(t.time_ms, 1)}</td></tr>`).join("");
    out += `<table class="tests"><thead><tr><th>test</th><th>result</th><th>status</th><th>error</th><th>message</th><th>ms</th></tr></thead><tbody>${rows}</tbody></table>`;
    if (evaluation.stderr) out += `<details><summary>stderr</summary>${pre(evaluation.stderr)}</details>`;
    return out;
  }
  function shortJson(value) {
    return JSON.stringify(value, (k, v) => (typeof v === "string" && v.length > 600 ? v.slice(0, 600) + "..." : v), 2);
  }
  function traceHtml(run) {
    const calls = run.trace || [];
    if (!calls.length) return "<p class=\"muted\">No operator was called.</p>";
    return calls.map((c) => {
      const timing = `started +${num(c.started_s, 2)} s` + (c.duration_s !== null && c.duration_s !== undefined ? `, took ${num(c.duration_s, 2)} s` : "");
      let out = `<div class="op-call${c.error ? " error" : ""}" data-operator="${esc(c.operator)}">
        <b>#${c.index} ${esc(c.operator)}</b> <span class="muted">worker ${esc(c.worker)}, ${timing}</span>`;
      out += `<details><summary>arguments</summary>${pre(shortJson(c.arguments))}</details>`;
      (c.worker_calls || []).forEach((w, j) => {
        out += `<div class="worker-call"><span class="muted">worker call ${j + 1}: ${w.prompt_tokens} prompt + ${w.completion_tokens} completion tokens, ${num(w.latency_s, 2)} s${w.finish_reason ? ", " + esc(w.finish_reason) : ""}</span>
          <div><b>worker prompt</b></div>${pre(w.prompt, "worker-prompt")}<div><b>worker reply</b></div>${pre(w.reply, "worker-reply")}</div>`;
      });
      (c.test_runs || []).forEach((t) => {
        out += `<div class="worker-call"><b>tests run:</b> ${t.num_passed}/${t.num_tests} passed (${num(t.time_ms, 1)} ms)${t.failures.length ? pre(t.failures.join("\n")) : ""}</div>`;
      });
      if (c.result) out += `<details><summary>result</summary>${pre(shortJson(c.result))}</details>`;
      if (c.error) out += `<p class="warn">${esc(c.error)}</p>`;
      return out + "</div>";
    }).join("");
  }
  function renderSample(i) {
    if (!(i >= 0 && i < COUNT)) {
      main.innerHTML = `<p class="warn">There is no sample #${esc(i)} in this report (it has ${COUNT}).</p>`;
      return;
    }
    main.innerHTML = "<p>Loading the sample...</p>";
    loadSample(i).then((d) => {
      const siblings = [];
      for (let j = 0; j < COUNT; j++) if (IDX.source[j] === IDX.source[i] && IDX.group[j] === IDX.group[i]) siblings.push(j);
      const terms = Object.entries(d.reward || {});
      let out = `<h2>Sample #${i}: ${esc(d.task_id)} <span class="outcome-${esc(d.outcome)}">${esc(d.outcome)}</span></h2>
        <p><a href="#samples?source=${IDX.source[i]}">&larr; ${esc(sourceLabel(IDX.source[i]))}</a>
        ${i > 0 ? `<a href="#sample/${i - 1}">previous</a>` : ""} ${i + 1 < COUNT ? `<a href="#sample/${i + 1}">next</a>` : ""}
        &nbsp; group ${d.group}: ${siblings.map((j) => (j === i ? `<b>${IDX.sample[j]}</b>` : `<a href="#sample/${j}">${IDX.sample[j]}</a>`)).join(" ")}</p>
        <p class="meta"><span>run ${esc(runName(FR.sources[IDX.source[i]].run))}</span><span>dataset ${esc(d.dataset)}</span>
        <span>mode ${esc(d.mode)}</span><span>weight version ${esc(d.weight_version)}</span><span>seed ${esc(d.seed)}</span>
        <span>finish ${esc(d.finish_reason)}</span><span>${esc(d.response_tokens)} tokens</span></p>`;
      if (d.flags.length) out += `<div class="warn">${d.flags.map((x) => `<div>${esc(x)}</div>`).join("")}</div>`;
      out += `<h3>Reward</h3><table id="reward-terms"><tr>${terms.map(([k]) => `<th>${esc(k)}</th>`).join("")}<th>advantage</th><th>group has variance</th><th>tests</th></tr>
        <tr>${terms.map(([, v]) => `<td class="num">${num(v, 4)}</td>`).join("")}<td class="num">${num(d.advantage, 4)}</td>
        <td>${esc(d.group_has_variance)}</td><td class="num">${d.total ? `${d.passed}/${d.total}` : ""}</td></tr></table>`;
      out += `<details><summary>Prompt</summary>${d.prompt === undefined ? "<p class=\"muted\">not recorded</p>" : pre(d.prompt, "prompt")}</details>`;
      if (d.reasoning) out += `<h3>Reasoning</h3>${pre(d.reasoning, "reasoning")}`;
      out += `<details${d.design ? "" : " open"}><summary>Answer</summary>${pre(d.answer, "answer")}</details>`;
      if (d.design) {
        out += `<h3>Design</h3><p><b>modification:</b> ${esc(d.design.modification)}</p>`;
        if (d.design.error) out += `<p class="warn">${esc(d.design.error)}</p>`;
        (d.design.warnings || []).forEach((w) => { out += `<p class="muted">${esc(w)}</p>`; });
        out += d.flow ? flowSvg(d.flow) : "<p class=\"muted\">The graph has no Workflow.__call__ to draw.</p>";
        out += `<details><summary>graph</summary>${pre(d.design.graph)}</details><details><summary>prompt constants</summary>${pre(d.design.prompt)}</details>`;
      }
      const run = d.workflow;
      if (run) {
        const w = run.worker || {};
        out += `<h3>Workflow run</h3><p class="meta"><span>${num(run.wall_s, 2)} s</span><span>operators ${esc(shortJson(run.operator_calls))}</span>
          <span>worker ${w.calls} calls, ${w.prompt_tokens} + ${w.completion_tokens} tokens</span><span>${run.test_runs} public test runs</span></p>`;
        if (run.failure) out += `<div class="warn"><b>${esc(run.failure.kind)}</b>: ${esc(run.failure.message)}${run.failure.traceback ? pre(run.failure.traceback) : ""}</div>`;
        out += `<h3>Trace</h3><div id="trace">${traceHtml(run)}</div>`;
      }
      const scored = JSON.stringify(d.sandbox);
      const mark = (evaluation) => (evaluation && JSON.stringify(evaluation) === scored ? " (scored)" : "");
      out += `<div id="tests">${run
        ? testTable("Public tests" + mark(run.public), run.public) + testTable("Hidden tests" + mark(run.hidden), run.hidden)
        : testTable("Tests", d.sandbox)}</div>`;
      if (d.solution) out += `<h3>Solution</h3>${pre(d.solution, "solution")}`;
      main.innerHTML = out;
    }).catch((err) => { main.innerHTML = `<p class="warn">${esc(err.message)}</p>`; });
  }

  // ---------------------------------------------------------------------------------------------- eval tables
  function renderEval() {
    if (!FR.evals.length) {
      main.innerHTML = "<p class=\"muted\">No evaluation in these runs yet (python -m fr_jax.eval writes eval/&lt;split&gt;.json).</p>";
      return;
    }
    main.innerHTML = FR.evals.map((t) => {
      const head = `<tr><th>method</th>${t.columns.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>`;
      const body = t.rows.map((row) => {
        const name = row.source === null ? esc(row.method) : `<a href="#samples?source=${row.source}">${esc(row.method)}</a>`;
        return `<tr><td>${name}</td>${t.columns.map((c) => `<td class="num">${num(row.values[c])}</td>`).join("")}</tr>`;
      }).join("");
      let out = `<h2>${esc(runName(t.run))}: ${esc(t.title)}${t.split ? ` (${esc(t.split)})` : ""}</h2><table class="eval">${head}${body}</table>`;
      const methods = Object.keys(t.per_task || {});
      if (methods.length) {
        const tasks = [...new Set(methods.flatMap((m) => Object.keys(t.per_task[m])))].sort();
        const sourceOf = {};
        t.rows.forEach((row) => { sourceOf[row.method] = row.source; });
        out += `<details><summary>per query (correct samples of ${esc(t.samples_per_task)})</summary><table class="per-task"><tr><th>task</th>${methods.map((m) => `<th>${esc(m)}</th>`).join("")}</tr>` +
          tasks.map((task) => `<tr><td>${esc(task)}</td>${methods.map((m) => {
            const value = t.per_task[m][task];
            const link = sourceOf[m] === null ? null : `#samples?source=${sourceOf[m]}&task=${encodeURIComponent(task)}`;
            return `<td class="num">${link ? `<a href="${link}">${esc(value)}</a>` : esc(value)}</td>`;
          }).join("")}</tr>`).join("") + "</table></details>";
      }
      return out;
    }).join("");
  }

  // ------------------------------------------------------------------------------------------------- routing
  function route() {
    const hash = location.hash.slice(1) || "curves";
    const cut = hash.indexOf("?");
    const [path, query] = cut < 0 ? [hash, ""] : [hash.slice(0, cut), hash.slice(cut + 1)];
    const [tab, arg] = decodeURIComponent(path).split("/");
    document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
    if (tab === "sample") renderSample(Number(arg));
    else if (tab === "samples" || tab === "suspicious") renderSamples(tab, query);
    else if (tab === "eval") renderEval();
    else renderCurves();
  }
  document.getElementById("legend").innerHTML = FR.runs.map((r) =>
    `<span class="run" title="${esc(r.path)}"><i style="background:${r.color}"></i>${esc(r.name)}</span>`).join("") +
    `<span class="muted">${COUNT} samples, built ${esc(FR.built)}${FR.live ? " (live)" : ""}</span>`;
  window.addEventListener("hashchange", route);
  route();

  if (FR.live && location.protocol.startsWith("http")) {  // --serve: reload when a rebuild has new data
    setInterval(() => {
      fetch("build.json", { cache: "no-store" }).then((r) => r.json()).then((b) => {
        if (b.build !== FR.build) location.reload();
      }).catch(() => {});
    }, 3000);
  }
})();
