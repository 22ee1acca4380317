// Stand-in for the WebUI page's progress-bar helpers (A1111 1.10 / Forge / reForge
// javascript/progressbar.js), written from research a1111.md §2.6 for the browser test:
//   randomId()                      -> "task(<random>)"
//   requestProgress(id, el, gallery, atEnd)
//       inserts <div class="progressDiv"><div class="progress"></div></div> into el's
//       parent, just before el; polls POST ./internal/progress {id_task} every 500 ms and
//       writes "<textinfo> NN% ETA: …" into the inner div, whose width is the progress;
//       removes the bar once the task is completed (or went inactive after being active)
//       and calls atEnd.
// Each reply is also pushed onto window.loraclrProgressLog so the test can read them.

window.loraclrProgressLog = [];

function randomId() {
    return "task(" + Math.random().toString(36).slice(2, 12) + ")";
}

function requestProgress(idTask, container, gallery, atEnd) {
    var parent = container.parentNode;
    var bar = document.createElement("div");
    bar.className = "progressDiv";
    var inner = document.createElement("div");
    inner.className = "progress";
    bar.appendChild(inner);
    parent.insertBefore(bar, container);
    var seenActive = false;

    function finish() {
        if (bar.parentNode) {
            bar.parentNode.removeChild(bar);
        }
        if (atEnd) {
            atEnd();
        }
    }

    function poll() {
        fetch("./internal/progress", {
            method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({id_task: idTask}),
        }).then(function(r) {
            return r.json();
        }).then(function(res) {
            window.loraclrProgressLog.push(res);
            if (res.completed || (seenActive && !res.active)) {
                finish();
                return;
            }
            seenActive = seenActive || res.active;
            var text = "";
            if (res.progress > 0) {
                text = (res.progress * 100).toFixed(0) + "%";
            }
            if (res.eta) {
                text += " ETA: " + Math.round(res.eta) + " s";
            }
            if (res.textinfo) {
                text = res.textinfo + " " + text;
            }
            inner.style.width = ((res.progress || 0) * 100) + "%";
            inner.textContent = text;
            setTimeout(poll, 500);
        }).catch(finish);
    }
    poll();
}
