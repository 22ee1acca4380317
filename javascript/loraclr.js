// LoRACLR Merge tab helpers. Only element ids (loraclr_*, txt2img_*, tab_txt2img) and the
// plain <textarea>/<input> gradio renders inside them are used, so the same code runs on
// the gradio 3.41 (A1111 1.10, reForge) and gradio 4.40 (Forge) DOM.

function loraclrApp() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

// The text field inside the block with this elem_id: gradio 3 renders a <textarea> for
// every Textbox, gradio 4 an <input> for single-line ones.
function loraclrField(elemId) {
    var block = loraclrApp().querySelector("#" + elemId);
    return block ? block.querySelector("textarea, input") : null;
}

// Set a field and tell gradio: both versions read the value on a bubbling `input` event.
function loraclrSetValue(field, value) {
    field.value = value;
    field.dispatchEvent(new Event("input", {bubbles: true}));
}

// Show a top-level WebUI tab. A1111 and Forge define switch_to_txt2img(); otherwise click
// the tab's button: gradio 4 gives it the id "tab_<name>-button", gradio 3 only its label.
function loraclrShowTab(name) {
    if (name === "txt2img" && typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
        return;
    }
    var app = loraclrApp();
    var button = app.querySelector("#tab_" + name + "-button");
    if (!button) {
        button = Array.prototype.find.call(app.querySelectorAll("button"), function(b) {
            return b.textContent.trim() === name && b.closest(".tab-nav, [role=tablist]");
        });
    }
    if (button) {
        button.click();
    }
}

// Where the WebUI's progress bar goes: it is inserted before the element given, so this is
// the anchor inside the tab's own progress area (#loraclr_progress, kept in the flow by
// style.css) rather than a block whose parent is the whole column.
function loraclrProgressAnchor() {
    var box = loraclrApp().querySelector("#loraclr_progress");
    if (!box) {
        return null;
    }
    return box.querySelector(".loraclr-progress-anchor") || box;
}

// Merge button: give the job a task id and show the WebUI progress bar (A1111's and
// Forge's randomId/requestProgress from progressbar.js), then pass the inputs on.
function loraclrStartMerge() {
    var args = Array.prototype.slice.call(arguments);
    var anchor = loraclrProgressAnchor();
    if (anchor && typeof randomId === "function" && typeof requestProgress === "function") {
        var id = randomId();
        args[0] = id;
        requestProgress(id, anchor, null, function() {});
    }
    return args;
}

// After a merge: let the txt2img / img2img Lora cards pick up the new file. Runs before the
// list's own rescan (a Python step whose inputs are the search text and the ticked LoRAs),
// so it hands those two inputs on unchanged.
function loraclrRefreshCards(query, selected) {
    ["txt2img", "img2img"].forEach(function(tab) {
        var button = loraclrApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) {
            button.click();
        }
    });
    return [query, selected];
}

// "Send to txt2img": append the prompt tag to the txt2img prompt and switch tabs. The
// button is disabled until a merge produced a tag; without one nothing happens at all.
function loraclrSendToTxt2img(tag) {
    if (!tag || !String(tag).trim()) {
        return [];
    }
    var box = loraclrField("txt2img_prompt");
    if (box) {
        loraclrSetValue(box, box.value ? box.value.replace(/[\s,]*$/, ", ") + tag : tag);
    }
    loraclrShowTab("txt2img");
    return [];  // the event has no outputs; gradio 3 fails on a value with nowhere to go
}
