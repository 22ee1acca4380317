// LoRACLR Merge tab helpers. Only element ids (loraclr_*, txt2img_*) are used, so the
// same code works with the gradio 3.41 (A1111 1.10) and 4.40 (Forge) DOM.

function loraclrApp() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

// Merge button: give the job a task id and show the WebUI progress bar (A1111's
// randomId/requestProgress from progressbar.js), then pass the inputs on.
function loraclrStartMerge() {
    var args = Array.prototype.slice.call(arguments);
    if (typeof randomId === "function" && typeof requestProgress === "function") {
        var id = randomId();
        args[0] = id;
        var box = loraclrApp().getElementById("loraclr_progress");
        requestProgress(id, box, null, function() {});
    }
    return args;
}

// After a merge: let the txt2img / img2img Lora cards pick up the new file.
function loraclrRefreshCards() {
    ["txt2img", "img2img"].forEach(function(tab) {
        var button = loraclrApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) {
            button.click();
        }
    });
    return [];
}

// "Send to txt2img": append the prompt tag to the txt2img prompt and switch tabs.
function loraclrSendToTxt2img(tag) {
    var box = loraclrApp().querySelector("#txt2img_prompt textarea");
    if (box && tag) {
        box.value = box.value ? box.value.replace(/[\s,]*$/, ", ") + tag : tag;
        if (typeof updateInput === "function") {
            updateInput(box);
        } else {
            box.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return [tag];
}
